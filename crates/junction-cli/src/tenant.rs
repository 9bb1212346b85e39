//! `junction tenant ...`

use anyhow::Context;

use crate::common::{ConnArgs, out, out_json};

/// Create and list tenants.
#[derive(clap::Args, Debug)]
pub struct TenantArgs {
    #[command(subcommand)]
    pub command: TenantCommand,
    #[command(flatten)]
    pub conn: ConnArgs,
}

#[derive(clap::Subcommand, Debug)]
pub enum TenantCommand {
    /// Create a tenant.
    Create { name: String },
    /// List tenants.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

pub(crate) async fn run(args: TenantArgs) -> anyhow::Result<()> {
    let client = args.conn.client()?;
    match args.command {
        TenantCommand::Create { name } => {
            client
                .create_tenant(&name)
                .await
                .with_context(|| format!("creating tenant {name}"))?;
            out(&format!("created tenant {name}\n"))
        }
        TenantCommand::List { json } => {
            let tenants = client.list_tenants().await.context("listing tenants")?;
            if json {
                return out_json(&serde_json::json!(tenants));
            }
            let mut text = String::new();
            for tenant in tenants {
                text.push_str(&tenant);
                text.push('\n');
            }
            out(&text)
        }
    }
}
