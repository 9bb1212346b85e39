//! An in-memory fake cluster (Admin + Broker) for testing the commands end to end.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use junction_client::proto::admin_server::{Admin, AdminServer};
use junction_client::proto::broker_server::{Broker, BrokerServer};
use junction_client::proto::*;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

#[derive(Default)]
struct State {
    tenants: BTreeSet<String>,
    stations: BTreeMap<String, (StationInfo, Vec<Vec<StoredMessage>>)>,
}

impl State {
    fn station(
        &mut self,
        name: &str,
    ) -> Result<&mut (StationInfo, Vec<Vec<StoredMessage>>), Status> {
        let full = if name.contains('/') {
            name.to_owned()
        } else {
            format!("default/{name}")
        };
        self.stations
            .get_mut(&full)
            .ok_or_else(|| Status::not_found(format!("station {full} not found")))
    }

    fn info(&mut self, name: &str) -> Result<StationInfo, Status> {
        let (info, logs) = self.station(name)?;
        let mut info = info.clone();
        info.partition_info = logs
            .iter()
            .enumerate()
            .map(|(p, log)| PartitionInfo {
                partition: p as u32,
                group_id: p as u64 + 1,
                replicas: vec![1, 2, 3],
                leader: Some(1),
                next_offset: log.len() as u64,
                start_offset: 0,
            })
            .collect();
        Ok(info)
    }

    fn produce(&mut self, req: &ProduceRequest) -> Result<Vec<MessagePosition>, Status> {
        let (_, logs) = self.station(&req.station)?;
        let partitions = logs.len() as u32;
        let mut positions = Vec::new();
        for m in &req.messages {
            let partition = match (m.partition, &m.key) {
                (Some(p), _) if p >= partitions => {
                    return Err(Status::invalid_argument("no such partition"));
                }
                (Some(p), _) => p,
                (None, Some(key)) => key.iter().map(|b| u32::from(*b)).sum::<u32>() % partitions,
                (None, None) => 0,
            };
            let log = &mut logs[partition as usize];
            let offset = log.len() as u64;
            log.push(StoredMessage {
                partition,
                offset,
                timestamp_ms: 1000 + offset as i64,
                key: m.key.clone(),
                headers: m.headers.clone(),
                payload: m.payload.clone(),
            });
            positions.push(MessagePosition { partition, offset });
        }
        Ok(positions)
    }

    fn read(&mut self, req: &ReadRequest) -> Result<ReadResponse, Status> {
        let (_, logs) = self.station(&req.station)?;
        let log = logs
            .get(req.partition as usize)
            .ok_or_else(|| Status::invalid_argument("no such partition"))?;
        let from = match req.start {
            Some(read_request::Start::Offset(o)) => o as usize,
            Some(read_request::Start::Position(2)) => log.len(),
            _ => 0,
        };
        let max = if req.max_messages == 0 {
            1000
        } else {
            req.max_messages as usize
        };
        let messages: Vec<_> = log.iter().skip(from).take(max.min(3)).cloned().collect();
        Ok(ReadResponse {
            next_offset: (from + messages.len()) as u64,
            high_watermark: log.len() as u64,
            start_offset: 0,
            messages,
        })
    }
}

#[derive(Clone, Default)]
pub(crate) struct Mock {
    state: Arc<Mutex<State>>,
}

impl Mock {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn payloads(&self, station: &str) -> Vec<Vec<String>> {
        let mut st = self.lock();
        st.station(station)
            .map(|(_, logs)| {
                logs.iter()
                    .map(|log| {
                        log.iter()
                            .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
                            .collect()
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    pub(crate) async fn start(self) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("bind: {e}"));
        let addr = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("addr: {e}"));
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(AdminServer::new(self.clone()))
                .add_service(BrokerServer::new(self))
                .serve_with_incoming(TcpListenerStream::new(listener))
                .await
        });
        addr
    }
}

#[tonic::async_trait]
impl Admin for Mock {
    async fn create_tenant(
        &self,
        request: Request<CreateTenantRequest>,
    ) -> Result<Response<CreateTenantResponse>, Status> {
        if !self.lock().tenants.insert(request.into_inner().name) {
            return Err(Status::already_exists("tenant exists"));
        }
        Ok(Response::new(CreateTenantResponse {}))
    }

    async fn list_tenants(
        &self,
        _: Request<ListTenantsRequest>,
    ) -> Result<Response<ListTenantsResponse>, Status> {
        let mut tenants: Vec<String> = self.lock().tenants.iter().cloned().collect();
        tenants.insert(0, "default".into());
        Ok(Response::new(ListTenantsResponse { tenants }))
    }

    async fn create_station(
        &self,
        request: Request<CreateStationRequest>,
    ) -> Result<Response<CreateStationResponse>, Status> {
        let req = request.into_inner();
        let (tenant, name) = req.name.split_once('/').unwrap_or(("default", &req.name));
        let full = format!("{tenant}/{name}");
        let mut st = self.lock();
        if st.stations.contains_key(&full) {
            return Err(Status::already_exists("station exists"));
        }
        let info = StationInfo {
            tenant: tenant.into(),
            name: name.into(),
            partitions: req.partitions.max(1),
            replication_factor: req.replication_factor,
            max_message_bytes: req.max_message_bytes,
            created_at_ms: 1_700_000_000_000,
            partition_info: vec![],
        };
        let logs = vec![Vec::new(); info.partitions as usize];
        st.stations.insert(full.clone(), (info, logs));
        let station = Some(st.info(&full)?);
        Ok(Response::new(CreateStationResponse { station }))
    }

    async fn list_stations(
        &self,
        request: Request<ListStationsRequest>,
    ) -> Result<Response<ListStationsResponse>, Status> {
        let tenant = request.into_inner().tenant;
        let stations = self
            .lock()
            .stations
            .values()
            .filter(|(info, _)| tenant.is_empty() || info.tenant == tenant)
            .map(|(info, _)| info.clone())
            .collect();
        Ok(Response::new(ListStationsResponse { stations }))
    }

    async fn describe_station(
        &self,
        request: Request<DescribeStationRequest>,
    ) -> Result<Response<DescribeStationResponse>, Status> {
        let station = Some(self.lock().info(&request.into_inner().name)?);
        Ok(Response::new(DescribeStationResponse { station }))
    }

    async fn delete_station(
        &self,
        request: Request<DeleteStationRequest>,
    ) -> Result<Response<DeleteStationResponse>, Status> {
        let name = request.into_inner().name;
        let mut st = self.lock();
        let info = st.info(&name)?;
        st.stations
            .remove(&format!("{}/{}", info.tenant, info.name));
        Ok(Response::new(DeleteStationResponse {}))
    }

    async fn cluster_status(
        &self,
        _: Request<ClusterStatusRequest>,
    ) -> Result<Response<ClusterStatusResponse>, Status> {
        let mut st = self.lock();
        let names: Vec<String> = st.stations.keys().cloned().collect();
        let stations = names
            .iter()
            .map(|n| st.info(n))
            .collect::<Result<Vec<_>, _>>()?;
        let nodes = (1..=3)
            .map(|id| NodeInfo {
                id,
                addr: format!("127.0.0.1:{}", 7700 + id),
                alive: id != 3,
                partition_replicas: 1,
                partition_leaders: u32::from(id == 1),
            })
            .collect();
        Ok(Response::new(ClusterStatusResponse {
            nodes,
            metadata_leader: Some(1),
            metadata_term: 4,
            stations,
        }))
    }
}

#[tonic::async_trait]
impl Broker for Mock {
    async fn produce(
        &self,
        request: Request<ProduceRequest>,
    ) -> Result<Response<ProduceResponse>, Status> {
        let req = request.into_inner();
        let positions = self.lock().produce(&req)?;
        Ok(Response::new(ProduceResponse {
            request_id: req.request_id,
            positions,
            error: None,
        }))
    }

    type ProduceStreamStream = ReceiverStream<Result<ProduceResponse, Status>>;

    async fn produce_stream(
        &self,
        request: Request<Streaming<ProduceRequest>>,
    ) -> Result<Response<Self::ProduceStreamStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let mock = self.clone();
        tokio::spawn(async move {
            while let Ok(Some(req)) = inbound.message().await {
                let reply = match mock.lock().produce(&req) {
                    Ok(positions) => ProduceResponse {
                        request_id: req.request_id,
                        positions,
                        error: None,
                    },
                    Err(status) => ProduceResponse {
                        request_id: req.request_id,
                        positions: vec![],
                        error: Some(BatchError {
                            code: status.code() as i32,
                            message: status.message().into(),
                            leader_addr: String::new(),
                        }),
                    },
                };
                if tx.send(Ok(reply)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn read(&self, request: Request<ReadRequest>) -> Result<Response<ReadResponse>, Status> {
        Ok(Response::new(self.lock().read(&request.into_inner())?))
    }

    type TailStream = ReceiverStream<Result<ReadResponse, Status>>;

    async fn tail(
        &self,
        request: Request<ReadRequest>,
    ) -> Result<Response<Self::TailStream>, Status> {
        let mut req = request.into_inner();
        let first = self.lock().read(&req)?;
        let (tx, rx) = mpsc::channel(16);
        let mock = self.clone();
        tokio::spawn(async move {
            let mut resp = first;
            loop {
                req.start = Some(read_request::Start::Offset(resp.next_offset));
                if !resp.messages.is_empty() && tx.send(Ok(resp)).await.is_err() {
                    return;
                }
                if tx.is_closed() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
                resp = match mock.lock().read(&req) {
                    Ok(resp) => resp,
                    Err(status) => {
                        let _ = tx.try_send(Err(status));
                        return;
                    }
                };
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
