//! Backend groups found by DNS, against a DNS server of the test's own on loopback that
//! answers a name with the addresses of nim-sims on 127.0.0.x (one port, several addresses, as
//! a Kubernetes headless Service answers with its pods): traffic spreads over the members;
//! a member that leaves the answer finishes its stream and gets nothing new; one that joins
//! takes traffic; a DNS server that stops answering leaves the members as they were.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nim_sim::{Sim, SimOptions};
use nimgate::config::raw::{RawBackend, RawDiscovery, RawRoute};
use nimgate_tests::*;
use simple_dns::rdata::{A, RData};
use simple_dns::{CLASS, Packet, QTYPE, ResourceRecord, TYPE};

const LLAMA: &str = "meta/llama-3.1-8b-instruct";
const NAME: &str = "nim-llama.nim.svc.cluster.local";

/// A DNS server on 127.0.0.1 answering A queries for `NAME` with the addresses set; other
/// names and types get an empty answer. Stops when dropped.
struct DnsServer {
    addr: SocketAddr,
    answer: Arc<Mutex<Vec<Ipv4Addr>>>,
    task: tokio::task::JoinHandle<()>,
}

impl DnsServer {
    async fn start(addresses: &[Ipv4Addr]) -> Self {
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let answer = Arc::new(Mutex::new(addresses.to_vec()));
        let serving = Arc::clone(&answer);
        let task = tokio::spawn(async move {
            let mut buf = [0u8; 1500];
            loop {
                let Ok((len, from)) = socket.recv_from(&mut buf).await else { return };
                let Ok(query) = Packet::parse(&buf[..len]) else { continue };
                let mut reply = Packet::new_reply(query.id());
                for question in &query.questions {
                    reply.questions.push(question.clone());
                    let wanted = question.qname.to_string().trim_end_matches('.') == NAME;
                    if wanted && question.qtype == QTYPE::TYPE(TYPE::A) {
                        for ip in serving.lock().unwrap().iter() {
                            let rdata = RData::A(A { address: u32::from(*ip) });
                            reply.answers.push(ResourceRecord::new(question.qname.clone(), CLASS::IN, 1, rdata));
                        }
                    }
                }
                if let Ok(bytes) = reply.build_bytes_vec() {
                    let _ = socket.send_to(&bytes, from).await;
                }
            }
        });
        Self { addr, answer, task }
    }

    fn answer(&self, addresses: &[Ipv4Addr]) {
        *self.answer.lock().unwrap() = addresses.to_vec();
    }

    fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A nim-sim on `ip:port`.
async fn sim_at(ip: Ipv4Addr, port: u16, gated: bool) -> Sim {
    let listener = tokio::net::TcpListener::bind((ip, port)).await.unwrap();
    let options = SimOptions { models: vec![LLAMA.into()], tokens: 4, gated_chunks: gated, ..SimOptions::default() };
    Sim::start_on(listener, options).await.unwrap()
}

/// The group's member names on `/admin/backends`.
async fn members(gw: &TestGateway) -> Vec<String> {
    let listed = gw.admin_client().get("/admin/backends").await.json();
    let mut names: Vec<String> = listed["backends"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["group"] == "llama")
        .map(|b| b["name"].as_str().unwrap().to_owned())
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn a_group_follows_its_dns_answer_and_keeps_its_members_when_dns_fails() {
    let ip = |last: u8| Ipv4Addr::new(127, 0, 0, last);
    // One port on four loopback addresses.
    let first = sim_at(ip(2), 0, false).await;
    let port = first.addr().port();
    let sims =
        [first, sim_at(ip(3), port, false).await, sim_at(ip(4), port, true).await, sim_at(ip(5), port, false).await];
    let dns = DnsServer::start(&[ip(2), ip(3), ip(4)]).await;

    let logs = Logs::default();
    let _guard = logs.capture_text();
    let gw = gateway()
        .backend_with(RawBackend {
            name: "llama".into(),
            url: format!("http://{NAME}:{port}"),
            discovery: Some(RawDiscovery {
                dns: true,
                interval: Some("1s".into()),
                nameserver: Some(dns.addr.to_string()),
            }),
            ..RawBackend::default()
        })
        .route_with(RawRoute { model: LLAMA.into(), backends: vec!["llama".into()], ..RawRoute::default() })
        .key("team", &["*"])
        .start()
        .await;
    let member = |last: u8| format!("llama/127.0.0.{last}:{port}");
    eventually("three members", Duration::from_secs(5), || async { members(&gw).await.len() == 3 }).await;
    assert_eq!(members(&gw).await, [member(2), member(3), member(4)]);

    // Traffic spreads over the three (JSON answers; the third sim holds streams only).
    let client = gw.client("team");
    for _ in 0..60 {
        assert_eq!(client.chat(LLAMA).await.status, 200);
    }
    let served: Vec<u64> = sims.iter().map(|s| s.stats().requests).collect();
    assert!(served[..3].iter().all(|&n| n >= 8), "60 requests over three members: {served:?}");

    // A stream held by the third member.
    let mut held = None;
    for _ in 0..40 {
        let before = sims[2].stats().requests;
        let response = client.chat_stream(LLAMA).await;
        assert_eq!(response.status(), 200);
        if sims[2].stats().requests > before {
            held = Some(response.into_body());
            break;
        }
        all_frames(&mut response.into_body()).await;
    }
    let mut held = held.expect("a stream reached the third member");

    // The third leaves the answer: it gets nothing new, and finishes its stream.
    dns.answer(&[ip(2), ip(3)]);
    eventually("two members", Duration::from_secs(5), || async { members(&gw).await.len() == 2 }).await;
    let third_before = sims[2].stats().requests;
    for _ in 0..30 {
        assert_eq!(client.chat(LLAMA).await.status, 200);
    }
    assert_eq!(sims[2].stats().requests, third_before, "a member gone from DNS takes no new request");
    sims[2].release_chunks(100);
    let text: String = all_frames(&mut held).await.iter().map(|f| String::from_utf8_lossy(f).into_owned()).collect();
    assert!(text.ends_with("data: [DONE]\n\n"), "the stream in flight finished: {text}");

    // A fourth appears and takes traffic.
    dns.answer(&[ip(2), ip(3), ip(5)]);
    eventually("the fourth joins", Duration::from_secs(5), || async { members(&gw).await.contains(&member(5)) }).await;
    for _ in 0..30 {
        assert_eq!(client.chat(LLAMA).await.status, 200);
    }
    assert!(sims[3].stats().requests >= 3, "the new member takes its share: {}", sims[3].stats().requests);

    // DNS stops answering: the members stay, and the failure is said and counted.
    dns.stop();
    eventually("the failure is counted", Duration::from_secs(15), || async {
        let (_, samples) = scrape(&gw).await;
        samples.get("nimgate_discovery_errors_total{backend=\"llama\"}").copied().unwrap_or(0.0) >= 1.0
    })
    .await;
    assert_eq!(members(&gw).await, [member(2), member(3), member(5)]);
    let listed = gw.admin_client().get("/admin/backends").await.json();
    assert!(listed["groups"][0]["resolution_error"].is_string(), "{listed}");
    for _ in 0..10 {
        assert_eq!(client.chat(LLAMA).await.status, 200);
    }
    let text = logs.text();
    assert!(text.contains("DNS discovery failed: keeping the members found last"), "{text}");
    assert_eq!(text.matches("DNS discovery failed").count(), 1, "one line for the outage, not one per try");
}

#[tokio::test]
async fn a_reload_that_retunes_a_group_keeps_its_members_with_no_request_failing() {
    let ip = |last: u8| Ipv4Addr::new(127, 0, 0, last);
    let first = sim_at(ip(6), 0, false).await;
    let port = first.addr().port();
    let _sims = [first, sim_at(ip(7), port, false).await];
    let dns = DnsServer::start(&[ip(6), ip(7)]).await;
    let group = |weight: u32| RawBackend {
        name: "llama".into(),
        url: format!("http://{NAME}:{port}"),
        weight: Some(weight),
        discovery: Some(RawDiscovery {
            dns: true,
            interval: Some("1h".into()),
            nameserver: Some(dns.addr.to_string()),
        }),
        ..RawBackend::default()
    };
    let gw = gateway()
        .backend_with(group(1))
        .route_with(RawRoute { model: LLAMA.into(), backends: vec!["llama".into()], ..RawRoute::default() })
        .key("team", &["*"])
        .start_from_file()
        .await;
    eventually("two members", Duration::from_secs(5), || async { members(&gw.gw).await.len() == 2 }).await;

    // No DNS from now on: members after the reload can only be those carried over.
    dns.stop();
    let mut raw = gw.gw.gateway.snapshot().meta.source.as_deref().cloned().unwrap();
    raw.backends[0] = group(2);
    gw.write(&raw);
    assert_eq!(gw.admin_reload().await.status, 200);
    assert_eq!(members(&gw.gw).await.len(), 2, "the new group starts with the addresses of the old");
    let listed = gw.gw.admin_client().get("/admin/backends").await.json();
    assert!(listed["backends"].as_array().unwrap().iter().all(|b| b["weight"] == 2), "{listed}");
    for _ in 0..10 {
        assert_eq!(gw.gw.client("team").chat(LLAMA).await.status, 200);
    }
}
