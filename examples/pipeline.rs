//! An effectively-once consume → produce service: reads `orders` as consumer group
//! `billing`, writes one invoice per order to `invoices`, and acknowledges an order only once
//! its invoice is acknowledged. Kill it at any point and start it again: every order still
//! gets exactly one invoice, because each invoice carries a message id derived from its
//! order's position and `invoices` drops ids it already holds (its dedup window).
//!
//! Against `./scripts/dev`:
//!
//! ```sh
//! ./scripts/junction station create orders --partitions 3
//! ./scripts/junction station create invoices --partitions 3 --dedup-window 10m
//! seq 1 1000 | ./scripts/junction produce orders --key-sep ' '
//! cargo run --example pipeline -- 127.0.0.1:7701
//! ./scripts/junction station describe invoices
//! ```

use anyhow::Context;
use junction_client::{Client, Message, PipelineOptions};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let server = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:7701".to_owned());
    let client = Client::connect([server])?;
    let mut pipeline = client
        .pipeline("orders", "billing", "invoices", PipelineOptions::default())
        .await
        .context("starting the pipeline (does `invoices` have a dedup window?)")?;
    let mut invoiced = 0u64;
    while let Some(order) = pipeline.recv().await {
        let invoice = Message {
            key: order.message.key.clone(),
            headers: vec![],
            payload: format!(
                "invoice for order {}",
                String::from_utf8_lossy(&order.message.payload)
            )
            .into_bytes()
            .into(),
            partition: None,
            msg_id: None,
        };
        let positions = pipeline.complete(&order, vec![invoice]).await?;
        if positions.iter().all(|p| p.duplicate) {
            println!(
                "order {}/{}: invoice already written before a restart",
                order.partition(),
                order.offset()
            );
        }
        invoiced += 1;
        if invoiced.is_multiple_of(100) {
            println!("{invoiced} orders invoiced");
        }
    }
    pipeline.close().await?;
    Ok(())
}
