//! The metadata state machine: tenants, stations and placement ([`MetaState`]), kept in
//! memory and persisted whole (it is small) with `last_applied` on every apply.

use std::io;
use std::sync::Arc;

use futures::{Stream, TryStreamExt};
use junction_storage::Store;
use junction_types::{Command, CommandResponse, META_GROUP, MetaState};
use openraft::storage::{EntryResponder, RaftStateMachine};
use openraft::{EntryPayload, OptionalSend};
use tokio::sync::watch;

use crate::RaftStoreError;
use crate::format::{self, encode};
use crate::sm_common::{self, SnapshotBuilder};
use crate::snapshot::SnapshotData;
use crate::types::{LogId, Snapshot, SnapshotMeta, StoredMembership, TypeConfig};

/// Followers of the metadata: a watch of the applied state.
#[derive(Debug)]
pub struct MetaShared {
    tx: watch::Sender<Arc<MetaState>>,
    /// The index of the last applied log entry (0 before any): published after the state
    /// it produced, so a reader that sees an index also sees that state.
    applied: watch::Sender<u64>,
}

impl MetaShared {
    /// Returns the metadata as of the last apply.
    pub fn current(&self) -> Arc<MetaState> {
        self.tx.borrow().clone()
    }

    /// Returns a receiver that sees every change.
    pub fn subscribe(&self) -> watch::Receiver<Arc<MetaState>> {
        self.tx.subscribe()
    }

    /// Returns the index of the last applied entry: the metadata returned by
    /// [`MetaShared::current`] reflects every entry up to it.
    pub fn applied_index(&self) -> u64 {
        *self.applied.borrow()
    }

    /// Waits until the entry at `index` is applied here, for at most `limit`; returns
    /// whether it was.
    pub async fn wait_applied(&self, index: u64, limit: std::time::Duration) -> bool {
        let mut rx = self.applied.subscribe();
        matches!(
            tokio::time::timeout(limit, rx.wait_for(|a| *a >= index)).await,
            Ok(Ok(_))
        )
    }

    fn set_applied(&self, index: u64) {
        self.applied.send_if_modified(|a| {
            let newer = index > *a;
            if newer {
                *a = index;
            }
            newer
        });
    }
}

/// The metadata group's state machine.
pub struct MetaStateMachine {
    store: Store,
    state: MetaState,
    applied: Option<LogId>,
    membership: StoredMembership,
    /// The encoding of `state` as last persisted: what a snapshot carries.
    state_bytes: Vec<u8>,
    shared: Arc<MetaShared>,
}

impl MetaStateMachine {
    /// Opens the metadata state machine, recovering it from the store.
    pub fn open(store: Store) -> io::Result<Self> {
        let (applied, membership) = sm_common::load_applied(&store, META_GROUP)?;
        let (state, state_bytes): (MetaState, _) = sm_common::load_state(
            &store,
            META_GROUP,
            &format::META_STATE,
            format::decode_meta_state,
        )?;
        let (tx, _) = watch::channel(Arc::new(state.clone()));
        let (applied_tx, _) = watch::channel(applied.map_or(0, |l| l.index));
        Ok(Self {
            store,
            state,
            applied,
            membership,
            state_bytes,
            shared: Arc::new(MetaShared {
                tx,
                applied: applied_tx,
            }),
        })
    }

    /// Returns the handle that follows the applied metadata.
    pub fn shared(&self) -> Arc<MetaShared> {
        self.shared.clone()
    }
}

impl RaftStateMachine<TypeConfig> for MetaStateMachine {
    type SnapshotData = SnapshotData;
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> io::Result<(Option<LogId>, StoredMembership)> {
        Ok((self.applied, self.membership.clone()))
    }

    async fn apply<S>(&mut self, mut entries: S) -> io::Result<()>
    where
        S: Stream<Item = io::Result<EntryResponder<TypeConfig>>> + Unpin + OptionalSend,
    {
        let mut applied = None;
        let mut membership = None;
        let mut replies = Vec::new();
        let mut changed = false;
        while let Some((entry, responder)) = entries.try_next().await? {
            applied = Some(entry.log_id);
            let resp = match entry.payload {
                EntryPayload::Blank => CommandResponse::None,
                EntryPayload::Membership(m) => {
                    membership = Some(StoredMembership::new(Some(entry.log_id), m));
                    CommandResponse::None
                }
                EntryPayload::Normal(Command::Meta(cmd)) => {
                    changed = true;
                    self.state.apply(&cmd)
                }
                EntryPayload::Normal(Command::Partition(_)) => CommandResponse::WrongGroup,
            };
            if let Some(r) = responder {
                replies.push((r, resp));
            }
        }
        let mut b = self.store.batch();
        let bytes = encode(&format::META_STATE, &self.state)?;
        sm_common::put_applied(
            &mut b,
            META_GROUP,
            applied.as_ref(),
            membership.as_ref(),
            &bytes,
        )?;
        self.store.write_applied(b).map_err(RaftStoreError::from)?;
        if applied.is_some() {
            self.applied = applied;
        }
        if let Some(m) = membership {
            self.membership = m;
        }
        self.state_bytes = bytes;
        if changed {
            self.shared.tx.send_replace(Arc::new(self.state.clone()));
        }
        if let Some(a) = applied {
            self.shared.set_applied(a.index);
        }
        for (r, resp) in replies {
            r.send(resp);
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            store: self.store.clone(),
            group: META_GROUP,
            applied: self.applied,
            membership: self.membership.clone(),
            state: self.state_bytes.clone(),
            messages_below: None,
        }
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: SnapshotData,
    ) -> io::Result<()> {
        let path = sm_common::spool_file(snapshot).await?;
        let store = self.store.clone();
        let meta2 = meta.clone();
        let bytes = tokio::task::spawn_blocking(move || {
            sm_common::install_from_file(&store, META_GROUP, &meta2, &path, |_| {
                Ok(sm_common::InstallPlan::default())
            })
        })
        .await
        .map_err(io::Error::other)??;
        self.state = format::decode_meta_state(&bytes)?;
        // Snapshots from earlier builds carry version 1: keep the state in the current one.
        self.state_bytes = encode(&format::META_STATE, &self.state)?;
        self.applied = meta.last_log_id;
        self.membership = meta.last_membership.clone();
        self.shared.tx.send_replace(Arc::new(self.state.clone()));
        if let Some(a) = meta.last_log_id {
            self.shared.set_applied(a.index);
        }
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> io::Result<Option<Snapshot>> {
        sm_common::current_snapshot(&self.store, META_GROUP)
    }
}
