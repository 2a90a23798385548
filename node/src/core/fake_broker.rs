//! A minimal in-memory `Exchange` server for the link tests (plain HTTP/2 on
//! 127.0.0.1:0, one listener per participant so that the caller is known
//! without certificates). It follows the broker's contract only as far as
//! the node relies on it: idempotent submit, per-recipient queues, ack →
//! delivery receipt, reject → non-delivery report, `Withdraw` (of a message
//! not acknowledged), `GetStatus` (known or not), `GetInfo`.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use futures::Stream;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{Notify, mpsc};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status};
use trmx_proto::pb::exchange_server::{Exchange, ExchangeServer};
use trmx_proto::time::to_timestamp;
use trmx_proto::{Kind, MessageId, pb};

#[derive(Debug, Default)]
pub(crate) struct FakeState {
    /// Known participants.
    pub(crate) participants: Vec<String>,
    /// Kinds a participant accepts, where not every application kind.
    pub(crate) accepts: HashMap<String, Vec<Kind>>,
    /// Participants that `GetInfo` still lists but `Submit` no longer knows
    /// (gone from the registry since the node last asked).
    pub(crate) gone: Vec<String>,
    pub(crate) queues: HashMap<String, VecDeque<pb::Envelope>>,
    /// Envelopes accepted, by id, with their sender.
    pub(crate) accepted: HashMap<String, pb::Envelope>,
    pub(crate) acked: Vec<String>,
    pub(crate) rejected: Vec<(String, String, String)>,
    /// Message ids asked about with `GetStatus`.
    pub(crate) status_asked: Vec<String>,
    /// `limits.max_envelope_bytes` of `GetInfo`; 0: no limits sent.
    pub(crate) max_envelope_bytes: u64,
    /// Message ids withdrawn by their sender.
    pub(crate) withdrawn: Vec<String>,
    /// What `Withdraw` answers in place of withdrawing (a final state the fake does
    /// not model).
    pub(crate) withdraw_refusal: Option<(tonic::Code, String)>,
    /// `Submit` stores the envelope, then answers `UNAVAILABLE`: the answer lost on
    /// the way back.
    pub(crate) lose_submit_answers: bool,
    /// What `Submit` answers in place of storing.
    pub(crate) submit_refusal: Option<(tonic::Code, String)>,
    /// Outcomes `Ack` answers with besides the real ones: `NOT_FOUND` for this many
    /// ids never acknowledged (a broken broker's answer).
    pub(crate) ack_answer_junk: usize,
    /// `Ack` answers `NOT_FOUND` for the ids acknowledged, as a broker does for a
    /// delivery that went final (expired, dead-lettered, withdrawn, purged) before the ack.
    pub(crate) ack_not_found: bool,
    /// How many `Ack`s to answer `RESOURCE_EXHAUSTED` (the participant over its share of
    /// requests in progress) before acknowledging; counted down by each.
    pub(crate) ack_refusals: usize,
    /// `Ack` calls made (refused ones included).
    pub(crate) ack_calls: usize,
    /// How many `Reject`s to answer `RESOURCE_EXHAUSTED` before taking one.
    pub(crate) reject_refusals: usize,
    /// `Reject` calls made (refused ones included).
    pub(crate) reject_calls: usize,
    /// The `message_id` `GetStatus` answers with, in place of the one asked about (a
    /// broken broker's answer).
    pub(crate) status_answers_for: Option<String>,
    /// `GetStatus`'s answer about a message of the caller's, in place of the one its
    /// state here makes (a state this fake does not reach otherwise).
    pub(crate) status_of: HashMap<String, pb::MessageStatus>,
    /// `GetStatus` answers this error about these ids (a broker that cannot read one
    /// message's record, its store damaged).
    pub(crate) status_errors: HashMap<String, (tonic::Code, String)>,
    /// `Receive` opens, then ends at once with this status.
    pub(crate) end_streams: Option<(tonic::Code, String)>,
    /// `GetInfo` calls answered.
    pub(crate) get_info_calls: u64,
    /// `GetInfo` calls that arrived, answered or held ([`FakeBroker::get_info_hold`]).
    pub(crate) get_info_arrived: u64,
    /// The serial of the client certificate of each `Receive` call (served over TLS
    /// only), in order.
    pub(crate) receive_serials: Vec<String>,
    /// `Receive` streams of each participant whose serving task still runs: one the
    /// node dropped counts until the server has seen it closed, and an envelope
    /// queued before then goes down it, never read.
    pub(crate) open_streams: HashMap<String, usize>,
    /// `Submit` calls that passed the envelope check: a test that holds
    /// [`FakeBroker::submit_hold`] waits for this to know a submit is in flight.
    pub(crate) submits_arrived: usize,
    /// `Withdraw` calls answered or held ([`FakeBroker::withdraw_hold`]) after their
    /// work was done.
    pub(crate) withdraws_arrived: usize,
    seq: u64,
}

#[derive(Debug, Clone, Default)]
pub(crate) struct FakeBroker {
    pub(crate) state: Arc<Mutex<FakeState>>,
    notify: Arc<Notify>,
    /// Every `Submit` waits for this lock: a test holds it to keep submits
    /// in flight.
    pub(crate) submit_hold: Arc<tokio::sync::Mutex<()>>,
    /// Every `GetInfo` waits for this lock: a test holds it to keep a broker from
    /// answering (the proof of a new connection).
    pub(crate) get_info_hold: Arc<tokio::sync::Mutex<()>>,
    /// Every `Withdraw` waits for this lock after it has done its work, before it
    /// answers: a test holds it to keep the answer on its way.
    pub(crate) withdraw_hold: Arc<tokio::sync::Mutex<()>>,
    /// Every `Ack` and `Reject` waits for this lock before it does anything: a test
    /// holds it to keep a broker from answering them.
    pub(crate) ack_hold: Arc<tokio::sync::Mutex<()>>,
    /// Every `GetStatus` waits for this lock once it is counted in `status_asked`: a
    /// test holds it to keep a broker from answering.
    pub(crate) status_hold: Arc<tokio::sync::Mutex<()>>,
}

/// Counts a `Receive` stream in [`FakeState::open_streams`] while its task runs.
struct OpenStream {
    broker: FakeBroker,
    caller: String,
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        if let Some(open) = self.broker.lock().open_streams.get_mut(&self.caller) {
            *open -= 1;
        }
    }
}

/// One participant's view of the fake broker.
#[derive(Debug, Clone)]
struct Endpoint {
    broker: FakeBroker,
    caller: String,
}

impl FakeBroker {
    pub(crate) fn new(participants: &[&str]) -> Self {
        let broker = FakeBroker::default();
        broker.lock().participants = participants.iter().map(|p| (*p).to_owned()).collect();
        broker
    }

    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, FakeState> {
        self.state.lock().unwrap()
    }

    /// Serves `caller` on `listener` until the returned sender is dropped or fired.
    pub(crate) fn serve(
        &self,
        caller: &str,
        listener: TcpListener,
    ) -> tokio::sync::oneshot::Sender<()> {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let service = ExchangeServer::new(Endpoint {
            broker: self.clone(),
            caller: caller.to_owned(),
        });
        tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                    let _ = rx.await;
                })
                .await;
        });
        tx
    }

    /// [`FakeBroker::serve`] over mutual TLS with `tls`, as the broker does
    /// (the caller is still `caller`, whatever the client certificate says).
    pub(crate) fn serve_tls(
        &self,
        caller: &str,
        listener: TcpListener,
        tls: trmx_transport::ServerTls,
    ) -> tokio::sync::oneshot::Sender<()> {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let service = ExchangeServer::new(Endpoint {
            broker: self.clone(),
            caller: caller.to_owned(),
        });
        let conns = trmx_transport::incoming(
            listener,
            tls,
            trmx_transport::ListenerLimits::default(),
            async {
                let _ = rx.await;
            },
        );
        tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(conns)
                .await;
        });
        tx
    }

    /// Forgets message `id` as a broker restored from an older backup would.
    pub(crate) fn lose(&self, id: &str) {
        let mut st = self.lock();
        st.accepted.remove(id);
        for queue in st.queues.values_mut() {
            queue.retain(|e| e.message_id != id);
        }
    }

    /// Queues an envelope as if the broker had accepted it.
    pub(crate) fn enqueue(&self, mut envelope: pb::Envelope, sender: &str) {
        let mut st = self.lock();
        st.seq += 1;
        envelope.sender = sender.to_owned();
        // (not before it was made: the tests' nodes run on a manual clock, which may
        // be ahead of the system clock, and a node rejects a message made long
        // after the broker accepted it)
        let made = envelope
            .created_at
            .as_ref()
            .and_then(|ts| trmx_proto::time::from_timestamp(ts).ok())
            .unwrap_or(SystemTime::UNIX_EPOCH);
        envelope.accepted_at = Some(to_timestamp(SystemTime::now().max(made)));
        envelope.broker_seq = st.seq;
        st.accepted
            .insert(envelope.message_id.clone(), envelope.clone());
        st.queues
            .entry(envelope.recipient.clone())
            .or_default()
            .push_back(envelope);
        drop(st);
        self.notify.notify_waiters();
    }

    fn receipt(&self, original: &pb::Envelope, outcome: pb::Outcome, code: &str, field: &str) {
        let receipt = pb::Receipt {
            message_id: original.message_id.clone(),
            outcome: outcome as i32,
            at: Some(to_timestamp(SystemTime::now())),
            attempts: 1,
            last_delivered_at: None,
            reason_code: code.to_owned(),
            field_path: field.to_owned(),
        };
        let kind = if outcome == pb::Outcome::Delivered {
            Kind::DeliveryReceipt
        } else {
            Kind::NonDeliveryReport
        };
        let payload = prost::Message::encode_to_vec(&receipt);
        // (a test may enqueue an envelope whose id is none: no receipt for it)
        let Ok(id) = MessageId::parse(&original.message_id) else {
            return;
        };
        let envelope = pb::Envelope {
            message_id: MessageId::receipt_for(id, outcome).to_string(),
            recipient: original.sender.clone(),
            kind: kind.to_pb() as i32,
            case_ref: original.case_ref.clone(),
            priority: pb::Priority::Normal as i32,
            created_at: Some(to_timestamp(SystemTime::now())),
            payload_sha256: trmx_proto::envelope::sha256(&payload).to_vec(),
            payload,
            content_type: kind.content_type(),
            ..Default::default()
        };
        self.enqueue(envelope, "");
    }
}

pub(crate) async fn listener() -> (TcpListener, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    (listener, addr)
}

/// A port on 127.0.0.1 where nothing listens yet, for a broker that comes up later: a
/// socket bound to it with `SO_REUSEADDR` that never listens, so a connection is refused
/// and no other test can take the port meanwhile (one bound, then released, it could).
/// `TcpListener::bind(addr)` (which sets `SO_REUSEADDR` too) takes it over while the
/// returned socket lives: keep that as long as the address is in use.
pub(crate) fn reserved_port() -> (TcpSocket, SocketAddr) {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_reuseaddr(true).unwrap();
    socket.bind(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
    let addr = socket.local_addr().unwrap();
    (socket, addr)
}

/// A TCP relay on 127.0.0.1:0 to `target` whose connections a test can cut, as a
/// network failure or a broker restart does, while the broker behind it serves on.
#[derive(Debug)]
pub(crate) struct Relay {
    pub(crate) addr: SocketAddr,
    conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Relay {
    pub(crate) async fn start(target: SocketAddr) -> Relay {
        let (listener, addr) = listener().await;
        let conns = Arc::new(Mutex::new(Vec::new()));
        let open = Arc::clone(&conns);
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let relayed = tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                open.lock().unwrap().push(relayed.abort_handle());
            }
        });
        Relay {
            addr,
            conns,
            accept,
        }
    }

    /// Closes every connection open through the relay, at both ends.
    pub(crate) fn cut(&self) {
        for relayed in self.conns.lock().unwrap().drain(..) {
            relayed.abort();
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

impl Endpoint {
    /// What `Withdraw` of `id` does, and its answer.
    fn withdraw_now(&self, id: String) -> Result<Response<pb::WithdrawResponse>, Status> {
        let mut st = self.broker.lock();
        if let Some((code, message)) = st.withdraw_refusal.clone() {
            return Err(Status::new(code, message));
        }
        let recipient = match st.accepted.get(&id) {
            Some(envelope) if envelope.sender == self.caller => envelope.recipient.clone(),
            _ => {
                return Err(Status::not_found(format!(
                    "no message {id} from {}",
                    self.caller
                )));
            }
        };
        if st.acked.contains(&id) {
            return Err(Status::failed_precondition(format!(
                "message {id} was already acknowledged by its recipient"
            )));
        }
        if let Some(queue) = st.queues.get_mut(&recipient) {
            queue.retain(|e| e.message_id != id);
        }
        st.withdrawn.push(id);
        Ok(Response::new(pb::WithdrawResponse {
            withdrawn_at: Some(to_timestamp(SystemTime::now())),
        }))
    }
}

type DeliveryStream = Pin<Box<dyn Stream<Item = Result<pb::Delivery, Status>> + Send>>;

#[tonic::async_trait]
impl Exchange for Endpoint {
    async fn submit(
        &self,
        request: Request<pb::SubmitRequest>,
    ) -> Result<Response<pb::SubmitReceipt>, Status> {
        let envelope = request
            .into_inner()
            .envelope
            .ok_or_else(|| Status::invalid_argument("envelope: is required"))?;
        trmx_proto::envelope::SubmitEnvelope::check(&envelope)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        self.broker.lock().submits_arrived += 1;
        drop(self.broker.submit_hold.lock().await);
        if let Some((code, message)) = self.broker.lock().submit_refusal.clone() {
            return Err(Status::new(code, message));
        }
        let duplicate = {
            let st = self.broker.lock();
            if !st.participants.contains(&envelope.recipient)
                || st.gone.contains(&envelope.recipient)
            {
                return Err(Status::not_found("envelope.recipient: unknown participant"));
            }
            match st.accepted.get(&envelope.message_id) {
                Some(first) => {
                    let mut mine = first.clone();
                    mine.sender.clear();
                    mine.accepted_at = None;
                    mine.broker_seq = 0;
                    if mine != envelope {
                        return Err(Status::already_exists("message_id: used"));
                    }
                    true
                }
                None => false,
            }
        };
        if !duplicate {
            self.broker.enqueue(envelope.clone(), &self.caller);
        }
        if self.broker.lock().lose_submit_answers {
            return Err(Status::unavailable("connection reset"));
        }
        Ok(Response::new(pb::SubmitReceipt {
            message_id: envelope.message_id,
            duplicate,
            ..Default::default()
        }))
    }

    type ReceiveStream = DeliveryStream;

    async fn receive(
        &self,
        request: Request<pb::ReceiveRequest>,
    ) -> Result<Response<Self::ReceiveStream>, Status> {
        let serial = request
            .peer_certs()
            .and_then(|certs| certs.first().cloned())
            .and_then(|leaf| trmx_certs::CertInfo::from_der(&leaf).ok())
            .map(|info| info.serial_hex);
        if let Some(serial) = serial {
            self.broker.lock().receive_serials.push(serial);
        }
        let (tx, rx) = mpsc::channel(8);
        if let Some((code, message)) = self.broker.lock().end_streams.clone() {
            tx.try_send(Err(Status::new(code, message))).unwrap();
            return Ok(Response::new(Box::pin(ReceiverStream::new(rx))));
        }
        let broker = self.broker.clone();
        let caller = self.caller.clone();
        *broker
            .lock()
            .open_streams
            .entry(caller.clone())
            .or_default() += 1;
        let open = OpenStream {
            broker: broker.clone(),
            caller: caller.clone(),
        };
        tokio::spawn(async move {
            let _open = open;
            loop {
                let notified = broker.notify.notified();
                let next = broker
                    .lock()
                    .queues
                    .get_mut(&caller)
                    .and_then(VecDeque::pop_front);
                match next {
                    Some(envelope) => {
                        let delivery = pb::Delivery {
                            envelope: Some(envelope.clone()),
                            attempt: 1,
                        };
                        if tx.send(Ok(delivery)).await.is_err() {
                            broker
                                .lock()
                                .queues
                                .entry(caller.clone())
                                .or_default()
                                .push_front(envelope);
                            return;
                        }
                    }
                    None => tokio::select! {
                        () = notified => {}
                        () = tx.closed() => return,
                    },
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn ack(
        &self,
        request: Request<pb::AckRequest>,
    ) -> Result<Response<pb::AckResponse>, Status> {
        drop(self.broker.ack_hold.lock().await);
        {
            let mut st = self.broker.lock();
            st.ack_calls += 1;
            if st.ack_refusals > 0 {
                st.ack_refusals -= 1;
                return Err(Status::resource_exhausted(
                    "NL-NRM already has 32 requests in progress at the broker",
                ));
            }
        }
        let mut results = Vec::new();
        for id in request.into_inner().message_ids {
            let original = {
                let mut st = self.broker.lock();
                st.acked.push(id.clone());
                if st.ack_not_found {
                    results.push(pb::AckOutcome {
                        message_id: id,
                        result: pb::AckResult::NotFound as i32,
                    });
                    continue;
                }
                st.accepted.get(&id).cloned()
            };
            if let Some(original) = original
                && !original.sender.is_empty()
            {
                self.broker
                    .receipt(&original, pb::Outcome::Delivered, "", "");
            }
            results.push(pb::AckOutcome {
                message_id: id,
                result: pb::AckResult::Acknowledged as i32,
            });
        }
        let junk = self.broker.lock().ack_answer_junk;
        results.extend((0..junk).map(|i| pb::AckOutcome {
            message_id: format!("junk-{i}\nFORGED"),
            result: pb::AckResult::NotFound as i32,
        }));
        Ok(Response::new(pb::AckResponse { results }))
    }

    async fn reject(
        &self,
        request: Request<pb::RejectRequest>,
    ) -> Result<Response<pb::RejectResponse>, Status> {
        drop(self.broker.ack_hold.lock().await);
        {
            let mut st = self.broker.lock();
            st.reject_calls += 1;
            if st.reject_refusals > 0 {
                st.reject_refusals -= 1;
                return Err(Status::resource_exhausted(
                    "NL-NRM already has 32 requests in progress at the broker",
                ));
            }
        }
        let r = request.into_inner();
        let original = {
            let mut st = self.broker.lock();
            st.rejected.push((
                r.message_id.clone(),
                r.reason_code.clone(),
                r.field_path.clone(),
            ));
            st.accepted.get(&r.message_id).cloned()
        };
        if let Some(original) = original {
            self.broker.receipt(
                &original,
                pb::Outcome::RejectedByRecipient,
                &r.reason_code,
                &r.field_path,
            );
        }
        Ok(Response::new(pb::RejectResponse {}))
    }

    async fn withdraw(
        &self,
        request: Request<pb::WithdrawRequest>,
    ) -> Result<Response<pb::WithdrawResponse>, Status> {
        let id = request.into_inner().message_id;
        let answer = self.withdraw_now(id);
        self.broker.lock().withdraws_arrived += 1;
        drop(self.broker.withdraw_hold.lock().await);
        answer
    }

    async fn get_status(
        &self,
        request: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::MessageStatus>, Status> {
        let id = request.into_inner().message_id;
        self.broker.lock().status_asked.push(id.clone());
        drop(self.broker.status_hold.lock().await);
        let st = self.broker.lock();
        if let Some((code, message)) = st.status_errors.get(&id) {
            return Err(Status::new(*code, message.clone()));
        }
        if let Some(other) = st.status_answers_for.clone() {
            return Ok(Response::new(pb::MessageStatus {
                message_id: other,
                state: pb::MessageState::Accepted as i32,
                ..Default::default()
            }));
        }
        match st.accepted.get(&id) {
            Some(envelope) if envelope.sender == self.caller && st.status_of.contains_key(&id) => {
                Ok(Response::new(st.status_of[&id].clone()))
            }
            Some(envelope) if envelope.sender == self.caller => {
                let state = if st.withdrawn.contains(&id) {
                    pb::MessageState::Withdrawn
                } else if st.acked.contains(&id) {
                    pb::MessageState::Acknowledged
                } else {
                    pb::MessageState::Accepted
                };
                Ok(Response::new(pb::MessageStatus {
                    message_id: id,
                    state: state as i32,
                    ..Default::default()
                }))
            }
            _ => Err(Status::not_found("message_id: no such message of yours")),
        }
    }

    async fn get_info(
        &self,
        _request: Request<pb::GetInfoRequest>,
    ) -> Result<Response<pb::BrokerInfo>, Status> {
        self.broker.lock().get_info_arrived += 1;
        drop(self.broker.get_info_hold.lock().await);
        let mut st = self.broker.lock();
        st.get_info_calls += 1;
        let participants = st
            .participants
            .iter()
            .map(|id| pb::Participant {
                id: id.clone(),
                display_name: format!("{id} (test)"),
                country: id[..2].to_owned(),
                organisation_type: pb::OrganisationType::Ngo as i32,
                accepts: st
                    .accepts
                    .get(id)
                    .map_or(&Kind::APPLICATION[..], Vec::as_slice)
                    .iter()
                    .map(|k| k.to_pb() as i32)
                    .collect(),
            })
            .collect();
        let limits = (st.max_envelope_bytes != 0).then(|| pb::BrokerLimits {
            max_envelope_bytes: st.max_envelope_bytes,
            ..Default::default()
        });
        drop(st);
        Ok(Response::new(pb::BrokerInfo {
            broker_name: "fake".into(),
            participants,
            limits,
            caller: self.caller.clone(),
        }))
    }
}
