//! Unary produce and read.

use junction_proto::v1::{
    Message, MessagePosition, ProduceRequest, ReadRequest, ReadResponse, StartPosition,
    read_request,
};

use crate::client::Client;
use crate::error::ClientError;

/// Where a read or tail starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// The first message still stored.
    Earliest,
    /// The partition's end: only messages produced from now on.
    Latest,
    /// This offset (clamped by the server to what is stored).
    Offset(u64),
    /// The first message with a timestamp at or after this many ms since the Unix epoch.
    Timestamp(i64),
}

impl Start {
    pub(crate) fn to_proto(self) -> read_request::Start {
        match self {
            Start::Earliest => read_request::Start::Position(StartPosition::Earliest as i32),
            Start::Latest => read_request::Start::Position(StartPosition::Latest as i32),
            Start::Offset(offset) => read_request::Start::Offset(offset),
            Start::Timestamp(ms) => read_request::Start::TimestampMs(ms),
        }
    }
}

pub(crate) fn read_request(
    station: &str,
    partition: u32,
    start: Start,
    max_messages: u32,
) -> ReadRequest {
    ReadRequest {
        station: station.to_owned(),
        partition,
        start: Some(start.to_proto()),
        max_messages,
        max_bytes: 0,
        local_replica: false,
    }
}

impl Client {
    /// Appends `messages` to `station` in one batch and returns each message's position, in
    /// order, once all are committed.
    ///
    /// Delivery is at-least-once: when an attempt fails with UNAVAILABLE or a connection
    /// error, the outcome is unknown and the batch is sent again, which may store it twice.
    pub async fn produce(
        &self,
        station: &str,
        messages: Vec<Message>,
    ) -> Result<Vec<MessagePosition>, ClientError> {
        let count = messages.len();
        let req = ProduceRequest {
            station: station.to_owned(),
            messages,
            request_id: 0,
            producer: None,
        };
        let resp = self
            .with_retry(|ch| {
                let req = req.clone();
                let mut broker = self.broker(ch);
                async move { broker.produce(req).await }
            })
            .await?
            .into_inner();
        if let Some(error) = resp.error {
            return Err(ClientError::Status {
                code: tonic::Code::from_i32(error.code),
                message: error.message,
            });
        }
        if resp.positions.len() != count {
            return Err(ClientError::invalid_response(format!(
                "produced {count} messages but got {} positions",
                resp.positions.len()
            )));
        }
        Ok(resp.positions)
    }

    /// Reads up to `max_messages` committed messages of one partition (0 means the server
    /// default, 1000). An empty reply with `next_offset == high_watermark` means the end.
    pub async fn read(
        &self,
        station: &str,
        partition: u32,
        start: Start,
        max_messages: u32,
    ) -> Result<ReadResponse, ClientError> {
        self.read_with(read_request(station, partition, start, max_messages))
            .await
    }

    /// Like [`Client::read`] with a raw request (e.g. to set `max_bytes`, or `local_replica`
    /// with a client that knows only that node).
    pub async fn read_with(&self, req: ReadRequest) -> Result<ReadResponse, ClientError> {
        let resp = self
            .with_retry(|ch| {
                let req = req.clone();
                let mut broker = self.broker(ch);
                async move { broker.read(req).await }
            })
            .await?;
        Ok(resp.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_maps_onto_the_oneof() {
        use read_request::Start as P;
        assert_eq!(Start::Earliest.to_proto(), P::Position(1));
        assert_eq!(Start::Latest.to_proto(), P::Position(2));
        assert_eq!(Start::Offset(7).to_proto(), P::Offset(7));
        assert_eq!(Start::Timestamp(-5).to_proto(), P::TimestampMs(-5));
    }
}
