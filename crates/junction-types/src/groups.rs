//! Consumer groups.
//!
//! Two halves, each replicated by a different Raft group:
//! - [`GroupMeta`] lives in the metadata group: the group's settings, its members and which
//!   member owns each partition. Assignment is computed inside the metadata apply
//!   ([`GroupMeta::rebalance`]), so it is deterministic, and it is *sticky*: a rebalance moves
//!   as few partitions as possible and only the moved partitions get a new epoch (fencing the
//!   previous owner) — the others keep flowing.
//! - [`GroupCursor`] lives in each partition's group: the contiguous acknowledged prefix plus
//!   what is acknowledged beyond it. It is what survives a leader failover.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::command::{CommandResponse, PartitionCommand};
use crate::names::{NameError, validate_part};

/// Longest consumer group name.
pub const MAX_GROUP_NAME_LEN: usize = 128;
/// Suffix of a station's dead-letter station.
pub const DEAD_LETTER_SUFFIX: &str = ".dls";

/// Validates a consumer group name (same alphabet as station names).
pub fn validate_group_name(name: &str) -> Result<(), NameError> {
    validate_part("consumer group", name, MAX_GROUP_NAME_LEN)
}

/// Returns the dead-letter station of `station` (`tenant/name` → `tenant/name.dls`).
pub fn dead_letter_station(station: &str) -> String {
    format!("{station}{DEAD_LETTER_SUFFIX}")
}

/// Where a new group starts reading a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StartFrom {
    /// The first retained message: replay everything.
    Earliest,
    /// The end of the partition when the group first reads it.
    Latest,
    /// A given offset (clamped to what is retained).
    Offset(u64),
    /// The first message at or after this time (ms since the Unix epoch).
    Timestamp(i64),
}

/// A group's delivery settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupSettings {
    pub start: StartFrom,
    /// How long a delivered message may stay unacknowledged before it is redelivered.
    pub ack_wait_ms: u64,
    /// After this many deliveries without an ack the message goes to the dead-letter station.
    pub max_deliveries: u32,
    /// Most unacknowledged messages per member and partition.
    pub max_in_flight: u32,
    /// A member that has not sent a heartbeat for this long is removed from the group.
    pub session_timeout_ms: u64,
}

impl Default for GroupSettings {
    fn default() -> Self {
        Self {
            start: StartFrom::Earliest,
            ack_wait_ms: 30_000,
            max_deliveries: 5,
            max_in_flight: 1000,
            session_timeout_ms: 10_000,
        }
    }
}

/// How a group's members share the station's partitions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum GroupMode {
    /// Each partition is delivered to one member at a time.
    #[default]
    Partitioned,
    /// Every member consumes every partition; each message key belongs to one member at a
    /// time, so a key's order holds while any number of members share a partition.
    KeyShared,
}

impl GroupMode {
    /// The mode's name as the API and CLI spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            GroupMode::Partitioned => "partitioned",
            GroupMode::KeyShared => "key_shared",
        }
    }
}

/// What happens to a message whose deliveries are used up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum OnMaxDeliveries {
    /// It is appended to the dead-letter station, and its key goes on.
    #[default]
    DeadLetter,
    /// Its key parks: the key's messages wait, in order, until an operator resumes or skips
    /// it; the other keys go on.
    Park,
}

impl OnMaxDeliveries {
    /// The name as the API and CLI spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            OnMaxDeliveries::DeadLetter => "dead_letter",
            OnMaxDeliveries::Park => "park",
        }
    }
}

/// How a group shares partitions among its members (fixed when the group is created).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lanes {
    pub mode: GroupMode,
    /// Messages of one key in flight at once.
    pub max_in_flight_per_key: u32,
    pub on_max_deliveries: OnMaxDeliveries,
}

impl Default for Lanes {
    fn default() -> Self {
        Self {
            mode: GroupMode::Partitioned,
            max_in_flight_per_key: 1,
            on_max_deliveries: OnMaxDeliveries::DeadLetter,
        }
    }
}

impl Lanes {
    /// Checks every setting's range.
    pub fn validate(&self) -> Result<(), GroupError> {
        if !(1..=1000).contains(&self.max_in_flight_per_key) {
            return Err(GroupError::MaxInFlightPerKey(self.max_in_flight_per_key));
        }
        Ok(())
    }
}

/// Why group settings or a group operation were refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[non_exhaustive]
pub enum GroupError {
    #[error("ack_wait must be between 100 ms and 12 hours, got {0} ms")]
    AckWait(u64),
    #[error("max_deliveries must be between 1 and 1000, got {0}")]
    MaxDeliveries(u32),
    #[error("max_in_flight must be between 1 and 100000, got {0}")]
    MaxInFlight(u32),
    #[error("session_timeout must be between 1 s and 10 minutes, got {0} ms")]
    SessionTimeout(u64),
    #[error("max_in_flight_per_key must be between 1 and 1000, got {0}")]
    MaxInFlightPerKey(u32),
    #[error("{0}")]
    LagBudget(String),
}

impl GroupSettings {
    /// Checks every setting's range.
    pub fn validate(&self) -> Result<(), GroupError> {
        if !(100..=12 * 3_600_000).contains(&self.ack_wait_ms) {
            return Err(GroupError::AckWait(self.ack_wait_ms));
        }
        if !(1..=1000).contains(&self.max_deliveries) {
            return Err(GroupError::MaxDeliveries(self.max_deliveries));
        }
        if !(1..=100_000).contains(&self.max_in_flight) {
            return Err(GroupError::MaxInFlight(self.max_in_flight));
        }
        if !(1000..=600_000).contains(&self.session_timeout_ms) {
            return Err(GroupError::SessionTimeout(self.session_timeout_ms));
        }
        Ok(())
    }
}

/// Who owns one partition, and since which generation (the partition's fencing epoch).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    pub member: String,
    pub epoch: u64,
}

/// One live member of a group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberMeta {
    /// Free-form client identification (host, process), for `describe`.
    pub client: String,
    pub joined_at_ms: i64,
    /// The group's generation when it joined: in a key-shared group, the fencing epoch of
    /// its subscriptions (a member that leaves and joins again gets a new one).
    pub epoch: u64,
}

/// A consumer group as the metadata group holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupMeta {
    /// `tenant/name` of the station the group reads.
    pub station: String,
    pub name: String,
    /// Unique across the cluster's life: a deleted and re-created group never inherits the
    /// old group's positions.
    pub uid: u64,
    pub settings: GroupSettings,
    pub created_at_ms: i64,
    /// Increases with every change of membership or assignment.
    pub generation: u64,
    pub members: BTreeMap<String, MemberMeta>,
    /// Index = partition. Empty slots in a key-shared group: every member consumes every
    /// partition.
    pub assignment: Vec<Option<Assignment>>,
    pub lanes: Lanes,
}

impl GroupMeta {
    /// Returns the partitions `member` consumes, with their epochs.
    pub fn partitions_of(&self, member: &str) -> Vec<(u32, u64)> {
        if self.lanes.mode == GroupMode::KeyShared {
            return match self.members.get(member) {
                Some(m) => (0..self.assignment.len() as u32)
                    .map(|p| (p, m.epoch))
                    .collect(),
                None => Vec::new(),
            };
        }
        self.assignment
            .iter()
            .enumerate()
            .filter_map(|(p, a)| match a {
                Some(a) if a.member == member => Some((p as u32, a.epoch)),
                _ => None,
            })
            .collect()
    }

    /// Recomputes the assignment after a membership change: balanced (counts differ by at
    /// most one) and sticky (a partition stays with its owner unless that owner left or holds
    /// more than its share). Partitions that change owner get the new generation as epoch.
    /// Returns whether anything changed; the generation advances only then. In a key-shared
    /// group nothing is assigned and every call is a change.
    pub fn rebalance(&mut self) -> bool {
        let n = self.assignment.len();
        let next_gen = self.generation + 1;
        let mut changed = false;
        if self.lanes.mode == GroupMode::KeyShared {
            // Nothing to assign (the partitions' leaders share keys among the members); the
            // generation still counts membership changes.
            self.generation = next_gen;
            return true;
        }
        // Orphans: owners that left.
        for slot in self.assignment.iter_mut() {
            if let Some(a) = slot
                && !self.members.contains_key(&a.member)
            {
                *slot = None;
                changed = true;
            }
        }
        if let Some(base) = n.checked_div(self.members.len()) {
            let m = self.members.len();
            let mut held: BTreeMap<&str, Vec<usize>> =
                self.members.keys().map(|k| (k.as_str(), vec![])).collect();
            for (p, slot) in self.assignment.iter().enumerate() {
                if let Some(a) = slot
                    && let Some(v) = held.get_mut(a.member.as_str())
                {
                    v.push(p);
                }
            }
            // Quotas: `base` each, and one more for the `extra` members already holding most,
            // which keeps moves to a minimum.
            let extra = n - base * m;
            let mut order: Vec<&str> = held.keys().copied().collect();
            order.sort_by(|a, b| held[b].len().cmp(&held[a].len()).then(a.cmp(b)));
            let quota: BTreeMap<&str, usize> = order
                .iter()
                .enumerate()
                .map(|(i, k)| (*k, base + usize::from(i < extra)))
                .collect();
            let mut release = Vec::new();
            for (member, parts) in held.iter_mut() {
                let q = quota[member];
                while parts.len() > q {
                    if let Some(p) = parts.pop() {
                        release.push(p);
                    }
                }
            }
            for p in release {
                self.assignment[p] = None;
                changed = true;
            }
            for p in 0..n {
                if self.assignment[p].is_some() {
                    continue;
                }
                let taker = held
                    .iter()
                    .filter(|(k, v)| v.len() < quota[*k])
                    .min_by(|a, b| a.1.len().cmp(&b.1.len()).then(a.0.cmp(b.0)))
                    .map(|(k, _)| k.to_string());
                if let Some(member) = taker {
                    if let Some(v) = held.get_mut(member.as_str()) {
                        v.push(p);
                    }
                    self.assignment[p] = Some(Assignment {
                        member,
                        epoch: next_gen,
                    });
                    changed = true;
                }
            }
        }
        if changed {
            self.generation = next_gen;
        }
        changed
    }
}

/// A group's position in one partition.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupCursor {
    /// The group incarnation this cursor belongs to ([`GroupMeta::uid`]).
    pub uid: u64,
    /// Every offset below this one is acknowledged (or dead-lettered).
    pub committed: u64,
    /// Acknowledged ranges `[start, end)` above `committed`, disjoint and not adjacent.
    pub acked: BTreeMap<u64, u64>,
    /// Increases with every seek, so the delivering leader knows to start over.
    pub seek_epoch: u64,
    /// Parked keys (`on_max_deliveries: park`) and the offset of each one's head: the
    /// message that used up its deliveries.
    pub parked: BTreeMap<Vec<u8>, u64>,
    /// How far behind the group may fall here before it is detached.
    pub budget: LagBudget,
    /// Since when (ms) the group is detached here: it fell past its budget, and no longer
    /// holds back `ack` retention, which may pass it. Cleared only by re-attaching.
    pub detached_at_ms: Option<i64>,
}

/// A group's isolation budget in a partition: how far behind it may fall before it is
/// detached, so a dead consumer never holds a station's `ack` retention (and everyone's disk)
/// forever. `None`: no limit of that kind; all `None`: never detached.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LagBudget {
    pub max_messages: Option<u64>,
    pub max_bytes: Option<u64>,
    pub max_age_ms: Option<u64>,
}

/// The longest age budget: a year.
pub const MAX_LAG_AGE_MS: u64 = 365 * 24 * 3600 * 1000;

/// How far behind a group is in a partition.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Lag {
    /// Messages from its position to the end.
    pub messages: u64,
    /// Their bytes.
    pub bytes: u64,
    /// How old the oldest of them is (0 when there is none).
    pub age_ms: u64,
}

impl LagBudget {
    /// Whether no limit is set.
    pub fn is_unlimited(&self) -> bool {
        self.max_messages.is_none() && self.max_bytes.is_none() && self.max_age_ms.is_none()
    }

    /// Refuses limits of 0 and ages over [`MAX_LAG_AGE_MS`].
    pub fn validate(&self) -> Result<(), GroupError> {
        for (what, v) in [
            ("max_lag_messages", self.max_messages),
            ("max_lag_bytes", self.max_bytes),
            ("max_lag_age_ms", self.max_age_ms),
        ] {
            if v == Some(0) {
                return Err(GroupError::LagBudget(format!(
                    "{what} must be at least 1 (leave it out for no limit)"
                )));
            }
        }
        if let Some(a) = self.max_age_ms
            && a > MAX_LAG_AGE_MS
        {
            return Err(GroupError::LagBudget(format!(
                "max_lag_age_ms must be at most {MAX_LAG_AGE_MS} (a year), not {a}"
            )));
        }
        Ok(())
    }

    /// Which limit `lag` is past, said in words; `None` while it is within every limit.
    pub fn exceeded_by(&self, lag: &Lag) -> Option<String> {
        if let Some(m) = self.max_messages
            && lag.messages > m
        {
            return Some(format!("{} messages behind, budget {m}", lag.messages));
        }
        if let Some(b) = self.max_bytes
            && lag.bytes > b
        {
            return Some(format!("{} bytes behind, budget {b}", lag.bytes));
        }
        if let Some(a) = self.max_age_ms
            && lag.age_ms > a
        {
            return Some(format!(
                "oldest unacknowledged message {} ms old, budget {a} ms",
                lag.age_ms
            ));
        }
        None
    }
}

/// A change of a group's isolation in one partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Isolation {
    /// Sets the budget (keeps the detached state).
    Budget(LagBudget),
    /// The group fell past its budget at `at_ms` (the leader's clock).
    Detach { at_ms: i64 },
    /// An operator attaches the group again: it holds back `ack` retention from its position.
    Reattach,
}

impl GroupCursor {
    /// A cursor starting at `start`.
    pub fn new(uid: u64, start: u64) -> Self {
        Self {
            uid,
            committed: start,
            acked: BTreeMap::new(),
            seek_epoch: 0,
            parked: BTreeMap::new(),
            budget: LagBudget::default(),
            detached_at_ms: None,
        }
    }

    /// Whether the group holds back `ack` retention here.
    pub fn is_detached(&self) -> bool {
        self.detached_at_ms.is_some()
    }

    /// Whether `offset` is acknowledged.
    pub fn is_acked(&self, offset: u64) -> bool {
        offset < self.committed
            || self
                .acked
                .range(..=offset)
                .next_back()
                .is_some_and(|(_, end)| offset < *end)
    }

    /// How many offsets above `committed` are acknowledged.
    pub fn acked_beyond(&self) -> u64 {
        self.acked.iter().map(|(s, e)| e - s).sum()
    }

    /// Marks `offset` acknowledged, merging ranges and advancing `committed`.
    pub fn ack(&mut self, offset: u64) {
        if self.is_acked(offset) {
            return;
        }
        let mut start = offset;
        let mut end = offset + 1;
        if let Some((s, e)) = self
            .acked
            .range(..offset)
            .next_back()
            .map(|(s, e)| (*s, *e))
            && e == offset
        {
            self.acked.remove(&s);
            start = s;
        }
        if let Some(e) = self.acked.remove(&end) {
            end = e;
        }
        if start == self.committed {
            self.committed = end;
        } else {
            self.acked.insert(start, end);
        }
    }

    /// Moves the cursor to `offset`, forgetting acks beyond it.
    pub fn seek(&mut self, offset: u64) {
        self.committed = offset;
        self.acked.clear();
        self.seek_epoch += 1;
        // A move settles what was parked: the keys' messages are delivered from the new
        // position like the others.
        self.parked.clear();
    }

    /// Skips everything below `first` (retention removed it).
    pub fn skip_to(&mut self, first: u64) {
        if first <= self.committed {
            return;
        }
        self.committed = first;
        let below: Vec<u64> = self.acked.range(..first).map(|(s, _)| *s).collect();
        for s in below {
            if let Some(e) = self.acked.remove(&s)
                && e > first
            {
                self.acked.insert(first, e);
            }
        }
        if let Some(e) = self.acked.remove(&self.committed) {
            self.committed = e;
        }
    }
}

/// The cursors of every group reading one partition, keyed by group name.
pub type GroupCursors = BTreeMap<String, GroupCursor>;

/// Applies a consumer-group command to a partition's cursors; `start..end` is the partition's
/// retained offset range. Commands for another incarnation of a group (a stale `uid`) change
/// nothing. Pure, so every replica ends with the same cursors.
pub fn apply_cursor_command(
    cursors: &mut GroupCursors,
    cmd: &PartitionCommand,
    start: u64,
    end: u64,
) -> CommandResponse {
    match cmd {
        PartitionCommand::Append { .. }
        | PartitionCommand::AppendBatches { .. }
        | PartitionCommand::AppendSpanned { .. }
        | PartitionCommand::Checked { .. }
        | PartitionCommand::Truncate { .. }
        | PartitionCommand::Compact { .. }
        | PartitionCommand::DataLost { .. } => CommandResponse::WrongGroup,
        PartitionCommand::GroupInit {
            group,
            uid,
            start: s,
        } => {
            let fresh = cursors.get(group).is_none_or(|c| c.uid != *uid);
            if fresh {
                cursors.insert(
                    group.clone(),
                    GroupCursor::new(*uid, (*s).clamp(start, end)),
                );
            }
            CommandResponse::Cursor(cursors.get(group).cloned())
        }
        PartitionCommand::GroupAck {
            group,
            uid,
            offsets,
        } => {
            if let Some(c) = cursors.get_mut(group)
                && c.uid == *uid
            {
                for o in offsets {
                    if *o < end {
                        c.ack(*o);
                    }
                }
                // A finished head is not parked any more, whichever write lands first.
                if !c.parked.is_empty() {
                    let acked: Vec<Vec<u8>> = c
                        .parked
                        .iter()
                        .filter(|(_, head)| c.is_acked(**head))
                        .map(|(k, _)| k.clone())
                        .collect();
                    for k in acked {
                        c.parked.remove(&k);
                    }
                }
            }
            CommandResponse::Cursor(cursors.get(group).cloned())
        }
        PartitionCommand::GroupSeek { group, uid, offset } => {
            let target = (*offset).clamp(start, end);
            match cursors.get_mut(group) {
                Some(c) if c.uid == *uid => c.seek(target),
                _ => {
                    let mut c = GroupCursor::new(*uid, target);
                    c.seek_epoch = 1;
                    cursors.insert(group.clone(), c);
                }
            }
            CommandResponse::Cursor(cursors.get(group).cloned())
        }
        PartitionCommand::GroupClone {
            from,
            from_uid,
            to,
            to_uid,
        } => {
            let src = cursors.get(from).filter(|c| c.uid == *from_uid).cloned();
            if let Some(mut c) = src {
                c.uid = *to_uid;
                c.seek_epoch += 1;
                // The clone starts attached: it is a new consumer, with the same budget.
                c.detached_at_ms = None;
                cursors.insert(to.clone(), c);
            }
            CommandResponse::Cursor(cursors.get(to).cloned())
        }
        PartitionCommand::GroupDelete { group } => {
            cursors.remove(group);
            CommandResponse::Done
        }
        PartitionCommand::GroupPark {
            group,
            uid,
            key,
            head,
        } => {
            if let Some(c) = cursors.get_mut(group)
                && c.uid == *uid
            {
                match head {
                    Some(o) => c.parked.insert(key.clone(), *o),
                    None => c.parked.remove(key),
                };
            }
            CommandResponse::Cursor(cursors.get(group).cloned())
        }
        PartitionCommand::GroupIsolation { group, uid, change } => {
            if let Some(c) = cursors.get_mut(group)
                && c.uid == *uid
            {
                match change {
                    Isolation::Budget(b) => c.budget = *b,
                    Isolation::Detach { at_ms } => {
                        if c.detached_at_ms.is_none() {
                            c.detached_at_ms = Some(*at_ms);
                        }
                    }
                    Isolation::Reattach => c.detached_at_ms = None,
                }
            }
            CommandResponse::Cursor(cursors.get(group).cloned())
        }
    }
}

/// Cursors as partition state versions 1 and 2 stored them (no parked keys).
pub mod cursor_v2 {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Serialize};

    use super::GroupCursor;

    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct GroupCursorV2 {
        pub uid: u64,
        pub committed: u64,
        pub acked: BTreeMap<u64, u64>,
        pub seek_epoch: u64,
    }

    impl From<GroupCursorV2> for GroupCursor {
        fn from(c: GroupCursorV2) -> Self {
            GroupCursor {
                uid: c.uid,
                committed: c.committed,
                acked: c.acked,
                seek_epoch: c.seek_epoch,
                parked: BTreeMap::new(),
                budget: super::LagBudget::default(),
                detached_at_ms: None,
            }
        }
    }

    /// Every group's cursor, as versions 1 and 2 stored them.
    pub type GroupCursorsV2 = BTreeMap<String, GroupCursorV2>;

    /// Upgrades the cursors of versions 1 and 2.
    pub fn upgrade(cs: GroupCursorsV2) -> super::GroupCursors {
        cs.into_iter().map(|(g, c)| (g, c.into())).collect()
    }
}

/// Cursors as partition state version 3 stored them (parked keys, no isolation budget).
pub mod cursor_v3 {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Serialize};

    use super::{GroupCursor, LagBudget};

    /// A group's position as version 3 stored it.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct GroupCursorV3 {
        pub uid: u64,
        pub committed: u64,
        pub acked: BTreeMap<u64, u64>,
        pub seek_epoch: u64,
        pub parked: BTreeMap<Vec<u8>, u64>,
    }

    impl From<GroupCursorV3> for GroupCursor {
        fn from(c: GroupCursorV3) -> Self {
            GroupCursor {
                uid: c.uid,
                committed: c.committed,
                acked: c.acked,
                seek_epoch: c.seek_epoch,
                parked: c.parked,
                budget: LagBudget::default(),
                detached_at_ms: None,
            }
        }
    }

    /// Every group's cursor, as version 3 stored them.
    pub type GroupCursorsV3 = BTreeMap<String, GroupCursorV3>;

    /// Upgrades the cursors of version 3.
    pub fn upgrade(cs: GroupCursorsV3) -> super::GroupCursors {
        cs.into_iter().map(|(g, c)| (g, c.into())).collect()
    }
}

/// Groups as the metadata stored them before lanes (metadata format versions 1 to 5).
pub mod v1 {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Serialize};

    use super::{Assignment, GroupMeta, GroupSettings, Lanes, MemberMeta};

    /// A member as versions 1 to 5 stored it (no epoch).
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct MemberMetaV1 {
        pub client: String,
        pub joined_at_ms: i64,
    }

    /// A group as versions 1 to 5 stored it (no lanes: every group was partitioned).
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct GroupMetaV1 {
        pub station: String,
        pub name: String,
        pub uid: u64,
        pub settings: GroupSettings,
        pub created_at_ms: i64,
        pub generation: u64,
        pub members: BTreeMap<String, MemberMetaV1>,
        pub assignment: Vec<Option<Assignment>>,
    }

    impl From<GroupMetaV1> for GroupMeta {
        fn from(g: GroupMetaV1) -> Self {
            // A partitioned group fences by its partitions' epochs; a member's own epoch is
            // only read in key-shared groups, so the generation it was read at serves.
            let generation = g.generation;
            GroupMeta {
                station: g.station,
                name: g.name,
                uid: g.uid,
                settings: g.settings,
                created_at_ms: g.created_at_ms,
                generation,
                members: g
                    .members
                    .into_iter()
                    .map(|(name, m)| {
                        (
                            name,
                            MemberMeta {
                                client: m.client,
                                joined_at_ms: m.joined_at_ms,
                                epoch: generation,
                            },
                        )
                    })
                    .collect(),
                assignment: g.assignment,
                lanes: Lanes::default(),
            }
        }
    }

    /// Upgrades a map of groups.
    pub fn upgrade<K: Ord>(groups: BTreeMap<K, GroupMetaV1>) -> BTreeMap<K, GroupMeta> {
        groups.into_iter().map(|(k, g)| (k, g.into())).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(partitions: usize, members: &[&str]) -> GroupMeta {
        let mut g = GroupMeta {
            station: "default/s".into(),
            name: "g".into(),
            uid: 1,
            settings: GroupSettings::default(),
            created_at_ms: 0,
            generation: 0,
            members: BTreeMap::new(),
            assignment: vec![None; partitions],
            lanes: Lanes::default(),
        };
        for m in members {
            g.members.insert(
                (*m).into(),
                MemberMeta {
                    client: String::new(),
                    joined_at_ms: 0,
                    epoch: 0,
                },
            );
        }
        g.rebalance();
        g
    }

    fn counts(g: &GroupMeta) -> BTreeMap<String, usize> {
        let mut c = BTreeMap::new();
        for a in g.assignment.iter().flatten() {
            *c.entry(a.member.clone()).or_insert(0) += 1;
        }
        c
    }

    fn owners(g: &GroupMeta) -> Vec<Option<String>> {
        g.assignment
            .iter()
            .map(|a| a.as_ref().map(|a| a.member.clone()))
            .collect()
    }

    #[test]
    fn a_key_shared_group_gives_every_member_every_partition_at_its_join_epoch() {
        let mut g = group(3, &[]);
        g.lanes.mode = GroupMode::KeyShared;
        for (m, epoch) in [("a", 4), ("b", 9)] {
            g.members.insert(
                m.into(),
                MemberMeta {
                    client: String::new(),
                    joined_at_ms: 0,
                    epoch,
                },
            );
            assert!(g.rebalance(), "a membership change advances the generation");
        }
        assert!(g.assignment.iter().all(Option::is_none));
        assert_eq!(g.partitions_of("a"), vec![(0, 4), (1, 4), (2, 4)]);
        assert_eq!(g.partitions_of("b"), vec![(0, 9), (1, 9), (2, 9)]);
        assert!(g.partitions_of("c").is_empty());
        assert_eq!(
            Lanes {
                max_in_flight_per_key: 0,
                ..Lanes::default()
            }
            .validate(),
            Err(GroupError::MaxInFlightPerKey(0))
        );
    }

    #[test]
    fn assignment_is_balanced_and_complete() {
        for parts in [1usize, 2, 5, 12, 13] {
            for m in 1..=6usize {
                let names: Vec<String> = (0..m).map(|i| format!("m{i}")).collect();
                let refs: Vec<&str> = names.iter().map(String::as_str).collect();
                let g = group(parts, &refs);
                assert!(g.assignment.iter().all(Option::is_some));
                let c = counts(&g);
                let max = c.values().max().copied().unwrap_or(0);
                let min = if c.len() < m {
                    0
                } else {
                    c.values().min().copied().unwrap_or(0)
                };
                assert!(max - min <= 1, "parts {parts} members {m}: {c:?}");
            }
        }
    }

    #[test]
    fn a_join_moves_only_what_it_must_and_keeps_other_epochs() {
        let mut g = group(12, &["a", "b", "c"]);
        let before = g.assignment.clone();
        g.members.insert(
            "d".into(),
            MemberMeta {
                client: String::new(),
                joined_at_ms: 0,
                epoch: 0,
            },
        );
        assert!(g.rebalance());
        let moved: Vec<usize> = (0..12)
            .filter(|p| {
                before[*p].as_ref().map(|a| &a.member)
                    != g.assignment[*p].as_ref().map(|a| &a.member)
            })
            .collect();
        assert_eq!(moved.len(), 3, "exactly the new member's share moves");
        for (p, (was, now)) in before.iter().zip(&g.assignment).enumerate() {
            if !moved.contains(&p) {
                assert_eq!(was, now, "unmoved partitions keep their epoch");
            } else {
                assert_eq!(now.as_ref().map(|a| a.epoch), Some(g.generation));
            }
        }
        assert!(counts(&g).values().all(|c| *c == 3));
    }

    #[test]
    fn a_leave_reassigns_only_the_orphans() {
        let mut g = group(6, &["a", "b", "c"]);
        let before = owners(&g);
        g.members.remove("b");
        assert!(g.rebalance());
        for (p, o) in before.iter().enumerate() {
            if o.as_deref() != Some("b") {
                assert_eq!(o, &owners(&g)[p]);
            }
        }
        assert!(counts(&g).values().all(|c| *c == 3));
        // Nothing to do: no new generation.
        let gen_before = g.generation;
        assert!(!g.rebalance());
        assert_eq!(g.generation, gen_before);
        g.members.clear();
        assert!(g.rebalance());
        assert!(g.assignment.iter().all(Option::is_none));
    }

    #[test]
    fn cursor_merges_acks_into_the_committed_prefix() {
        let mut c = GroupCursor::new(1, 10);
        c.ack(12);
        c.ack(14);
        assert_eq!(c.committed, 10);
        assert_eq!(c.acked_beyond(), 2);
        assert!(c.is_acked(12) && !c.is_acked(11) && c.is_acked(9));
        c.ack(13);
        assert_eq!(c.acked.len(), 1, "12..15 merged");
        c.ack(10);
        assert_eq!(c.committed, 11);
        c.ack(11);
        assert_eq!(c.committed, 15);
        assert!(c.acked.is_empty());
        c.ack(3); // below the prefix: ignored
        assert_eq!(c.committed, 15);
    }

    #[test]
    fn cursor_ack_matches_a_set_model() {
        // Deterministic pseudo-random orders against a plain set.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..200 {
            let mut c = GroupCursor::new(1, 0);
            let mut model = std::collections::BTreeSet::new();
            for _ in 0..60 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let o = x % 50;
                c.ack(o);
                model.insert(o);
                let prefix = (0..).take_while(|i| model.contains(i)).count() as u64;
                assert_eq!(c.committed, prefix);
                for i in 0..55 {
                    assert_eq!(c.is_acked(i), model.contains(&i), "offset {i}");
                }
                assert_eq!(c.committed + c.acked_beyond(), model.len() as u64);
            }
        }
    }

    #[test]
    fn skip_to_drops_what_retention_removed() {
        let mut c = GroupCursor::new(1, 0);
        c.ack(5);
        c.ack(6);
        c.ack(9);
        c.skip_to(6);
        assert_eq!(c.committed, 7);
        assert!(c.is_acked(9) && !c.is_acked(8));
        c.seek(2);
        assert_eq!((c.committed, c.acked_beyond(), c.seek_epoch), (2, 0, 1));
    }

    #[test]
    fn cursor_commands_respect_the_group_incarnation() {
        let mut cs = GroupCursors::new();
        let init = |uid, start| PartitionCommand::GroupInit {
            group: "g".into(),
            uid,
            start,
        };
        apply_cursor_command(&mut cs, &init(1, 0), 5, 100);
        assert_eq!(cs["g"].committed, 5, "clamped to the retained range");
        apply_cursor_command(&mut cs, &init(1, 50), 5, 100);
        assert_eq!(cs["g"].committed, 5, "init never moves an existing cursor");
        let ack = |uid, offsets: Vec<u64>| PartitionCommand::GroupAck {
            group: "g".into(),
            uid,
            offsets,
        };
        apply_cursor_command(&mut cs, &ack(1, vec![5, 6, 8, 200]), 5, 100);
        assert_eq!(cs["g"].committed, 7);
        assert!(cs["g"].is_acked(8) && !cs["g"].is_acked(99));
        apply_cursor_command(&mut cs, &ack(9, vec![7]), 5, 100);
        assert_eq!(cs["g"].committed, 7, "a stale incarnation's ack is ignored");
        apply_cursor_command(
            &mut cs,
            &PartitionCommand::GroupClone {
                from: "g".into(),
                from_uid: 1,
                to: "h".into(),
                to_uid: 2,
            },
            5,
            100,
        );
        assert_eq!((cs["h"].uid, cs["h"].committed), (2, 7));
        apply_cursor_command(&mut cs, &init(3, 0), 5, 100);
        assert_eq!(
            (cs["g"].uid, cs["g"].committed),
            (3, 5),
            "a re-created group starts afresh"
        );
        apply_cursor_command(
            &mut cs,
            &PartitionCommand::GroupSeek {
                group: "h".into(),
                uid: 2,
                offset: 1000,
            },
            5,
            100,
        );
        assert_eq!(cs["h"].committed, 100);
        apply_cursor_command(
            &mut cs,
            &PartitionCommand::GroupDelete { group: "h".into() },
            5,
            100,
        );
        assert!(!cs.contains_key("h"));
    }

    #[test]
    fn parked_keys_are_recorded_cleared_by_a_seek_and_kept_by_a_clone() {
        let mut cs = GroupCursors::new();
        apply_cursor_command(
            &mut cs,
            &PartitionCommand::GroupInit {
                group: "g".into(),
                uid: 1,
                start: 0,
            },
            0,
            100,
        );
        let park = |key: &str, head: Option<u64>, uid: u64| PartitionCommand::GroupPark {
            group: "g".into(),
            uid,
            key: key.as_bytes().to_vec(),
            head,
        };
        apply_cursor_command(&mut cs, &park("a", Some(7), 1), 0, 100);
        apply_cursor_command(&mut cs, &park("b", Some(9), 1), 0, 100);
        // Another incarnation's command changes nothing.
        apply_cursor_command(&mut cs, &park("c", Some(3), 2), 0, 100);
        apply_cursor_command(&mut cs, &park("b", None, 1), 0, 100);
        apply_cursor_command(&mut cs, &park("d", Some(11), 1), 0, 100);
        // An acked head is no longer parked.
        apply_cursor_command(
            &mut cs,
            &PartitionCommand::GroupAck {
                group: "g".into(),
                uid: 1,
                offsets: vec![11],
            },
            0,
            100,
        );
        let parked = |cs: &GroupCursors, g: &str| cs.get(g).map(|c| c.parked.clone());
        assert_eq!(parked(&cs, "g"), Some(BTreeMap::from([(b"a".to_vec(), 7)])));
        apply_cursor_command(
            &mut cs,
            &PartitionCommand::GroupClone {
                from: "g".into(),
                from_uid: 1,
                to: "h".into(),
                to_uid: 5,
            },
            0,
            100,
        );
        assert_eq!(parked(&cs, "h"), parked(&cs, "g"));
        apply_cursor_command(
            &mut cs,
            &PartitionCommand::GroupSeek {
                group: "g".into(),
                uid: 1,
                offset: 50,
            },
            0,
            100,
        );
        assert_eq!(
            parked(&cs, "g"),
            Some(BTreeMap::new()),
            "a seek settles them"
        );
    }

    #[test]
    fn settings_are_range_checked() {
        assert!(GroupSettings::default().validate().is_ok());
        let bad = GroupSettings {
            max_deliveries: 0,
            ..GroupSettings::default()
        };
        assert_eq!(bad.validate(), Err(GroupError::MaxDeliveries(0)));
        assert!(
            GroupSettings {
                ack_wait_ms: 5,
                ..GroupSettings::default()
            }
            .validate()
            .is_err()
        );
    }

    #[test]
    fn a_lag_budget_says_which_limit_is_past() {
        let b = LagBudget {
            max_messages: Some(100),
            max_bytes: None,
            max_age_ms: Some(60_000),
        };
        let within = Lag {
            messages: 100,
            bytes: u64::MAX,
            age_ms: 60_000,
        };
        assert_eq!(b.exceeded_by(&within), None);
        let many = Lag {
            messages: 101,
            ..within
        };
        assert!(
            b.exceeded_by(&many)
                .is_some_and(|w| w.contains("101 messages"))
        );
        let old = Lag {
            age_ms: 60_001,
            ..within
        };
        assert!(b.exceeded_by(&old).is_some_and(|w| w.contains("60001 ms")));
        assert_eq!(LagBudget::default().exceeded_by(&many), None);
        assert!(LagBudget::default().is_unlimited());
        assert!(b.validate().is_ok());
        for bad in [
            LagBudget {
                max_messages: Some(0),
                ..b
            },
            LagBudget {
                max_bytes: Some(0),
                ..b
            },
            LagBudget {
                max_age_ms: Some(MAX_LAG_AGE_MS + 1),
                ..b
            },
        ] {
            assert!(
                matches!(bad.validate(), Err(GroupError::LagBudget(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn detaching_is_sticky_until_reattached_and_a_clone_starts_attached() {
        let mut cs = GroupCursors::new();
        let init = PartitionCommand::GroupInit {
            group: "g".into(),
            uid: 7,
            start: 0,
        };
        apply_cursor_command(&mut cs, &init, 0, 10);
        let iso = |uid: u64, change: Isolation| PartitionCommand::GroupIsolation {
            group: "g".into(),
            uid,
            change,
        };
        let budget = LagBudget {
            max_messages: Some(5),
            ..LagBudget::default()
        };
        apply_cursor_command(&mut cs, &iso(7, Isolation::Budget(budget)), 0, 10);
        apply_cursor_command(&mut cs, &iso(7, Isolation::Detach { at_ms: 100 }), 0, 10);
        // A second detach keeps the first time; a stale incarnation changes nothing.
        apply_cursor_command(&mut cs, &iso(7, Isolation::Detach { at_ms: 200 }), 0, 10);
        apply_cursor_command(&mut cs, &iso(6, Isolation::Reattach), 0, 10);
        assert_eq!(cs["g"].detached_at_ms, Some(100));
        assert_eq!(cs["g"].budget, budget);
        // A seek keeps the state; a clone is a new consumer and starts attached.
        let seek = PartitionCommand::GroupSeek {
            group: "g".into(),
            uid: 7,
            offset: 3,
        };
        apply_cursor_command(&mut cs, &seek, 0, 10);
        assert!(cs["g"].is_detached());
        let clone = PartitionCommand::GroupClone {
            from: "g".into(),
            from_uid: 7,
            to: "h".into(),
            to_uid: 8,
        };
        apply_cursor_command(&mut cs, &clone, 0, 10);
        assert!(!cs["h"].is_detached());
        assert_eq!(cs["h"].budget, budget);
        apply_cursor_command(&mut cs, &iso(7, Isolation::Reattach), 0, 10);
        assert!(!cs["g"].is_detached());
    }
}
