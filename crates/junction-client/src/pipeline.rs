//! Effectively-once consume → produce: a consumer group member of one station that produces
//! its output to another station, so that a crash anywhere between the two never yields an
//! output twice.
//!
//! The pattern:
//! 1. each output message gets a message id derived from the position of its input,
//!    `STATION/PARTITION/OFFSET/N` (N counts the outputs of one input);
//! 2. the output station has a dedup window, so producing those ids again stores nothing new
//!    (the reply gives the first copy's position, marked `duplicate`);
//! 3. the input is acknowledged only after every output is acknowledged.
//!
//! A consumer that crashes after producing but before acknowledging gets the input delivered
//! again (to itself or another member), produces the same ids, and the station drops them.
//! The guarantee holds as long as a redelivery comes within the output's dedup window: keep
//! the window well above the group's ack deadline times its delivery attempts.

use std::sync::Arc;

use junction_proto::v1::{Message, MessagePosition};

use crate::client::Client;
use crate::error::ClientError;
use crate::group::{Acker, GroupConsumer, GroupMessage, GroupOptions};
use crate::producer::{Producer, ProducerOptions};

/// The message id of output `n` of the input at `partition`/`offset` of `station`.
pub fn output_msg_id(station: &str, partition: u32, offset: u64, n: usize) -> String {
    format!("{station}/{partition}/{offset}/{n}")
}

/// Settings of a [`Pipeline`].
#[derive(Debug, Clone, Default)]
pub struct PipelineOptions {
    /// How the consumer joins its group.
    pub group: GroupOptions,
    /// How outputs are produced (idempotent regardless).
    pub producer: ProducerOptions,
}

/// Consumes a station in a group and produces to another, effectively once (see the module
/// documentation). Inputs may be completed concurrently and in any order: hand
/// [`Pipeline::completer`]s to other tasks.
pub struct Pipeline {
    consumer: GroupConsumer,
    completer: Completer,
}

/// Completes inputs of a [`Pipeline`] from any task.
#[derive(Clone)]
pub struct Completer {
    input: Arc<str>,
    producer: Producer,
    acker: Acker,
}

impl Client {
    /// Starts a pipeline from `input` (consumed as group `group`) to `output`. Fails with
    /// FAILED_PRECONDITION when `output` has no dedup window, since without one a redelivered
    /// input would be produced twice.
    pub async fn pipeline(
        &self,
        input: &str,
        group: &str,
        output: &str,
        options: PipelineOptions,
    ) -> Result<Pipeline, ClientError> {
        let out = self.describe_station(output).await?;
        if out.policy.and_then(|p| p.dedup_window_ms).is_none() {
            return Err(ClientError::Status {
                code: tonic::Code::FailedPrecondition,
                message: format!(
                    "station '{output}' has no dedup window: a redelivered input would be produced twice; set one (e.g. `junction station update {output} --dedup-window 10m`)"
                ),
            });
        }
        let consumer = self.group_consumer(input, group, options.group).await?;
        let producer = self.producer(
            output,
            ProducerOptions {
                idempotent: true,
                ..options.producer
            },
        );
        let completer = Completer {
            input: input.into(),
            producer,
            acker: consumer.acker(),
        };
        Ok(Pipeline {
            consumer,
            completer,
        })
    }
}

impl Pipeline {
    /// The next input; `None` once the consumer stopped.
    pub async fn recv(&mut self) -> Option<GroupMessage> {
        self.consumer.recv().await
    }

    /// Produces `outputs` for `input` and then acknowledges it (see [`Completer::complete`]).
    pub async fn complete(
        &self,
        input: &GroupMessage,
        outputs: Vec<Message>,
    ) -> Result<Vec<MessagePosition>, ClientError> {
        self.completer.complete(input, outputs).await
    }

    /// A handle that completes inputs from other tasks.
    pub fn completer(&self) -> Completer {
        self.completer.clone()
    }

    /// The consumer, for acks of inputs that produce nothing, nacks and progress reports.
    pub fn consumer(&self) -> &GroupConsumer {
        &self.consumer
    }

    /// Stops: completes the outputs queued so far and leaves the group.
    pub async fn close(self) -> Result<(), ClientError> {
        self.completer.producer.close().await;
        self.consumer.close().await
    }
}

impl Completer {
    /// Produces `outputs` for `input` (each with its derived message id), waits until all are
    /// acknowledged, then acknowledges `input`. Returns the outputs' positions; a position
    /// marked `duplicate` was stored by an earlier delivery of the same input. On error the
    /// input is not acknowledged, so it is delivered again.
    pub async fn complete(
        &self,
        input: &GroupMessage,
        outputs: Vec<Message>,
    ) -> Result<Vec<MessagePosition>, ClientError> {
        let sends: Vec<_> = outputs
            .into_iter()
            .enumerate()
            .map(|(n, mut m)| {
                m.msg_id = Some(output_msg_id(
                    &self.input,
                    input.partition(),
                    input.offset(),
                    n,
                ));
                self.producer.send(m)
            })
            .collect();
        let mut positions = Vec::with_capacity(sends.len());
        for s in sends {
            positions.push(s.await?);
        }
        self.acker.ack(input);
        Ok(positions)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_ids_name_the_input_position() {
        assert_eq!(output_msg_id("acme/orders", 3, 41, 0), "acme/orders/3/41/0");
        assert_ne!(output_msg_id("a", 1, 2, 0), output_msg_id("a", 1, 2, 1));
        // The longest station name (64-byte tenant, 128-byte name) still fits in an id.
        let longest = format!("{}/{}", "t".repeat(64), "s".repeat(128));
        assert!(output_msg_id(&longest, u32::MAX, u64::MAX, 99_999).len() <= 256);
    }
}
