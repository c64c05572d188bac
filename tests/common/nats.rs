//! A JetStream stream of its own for each test, on the server named by `LABELHOOK_TEST_NATS`
//! (default `nats://127.0.0.1:4222`), deleted (with its object store) when the test ends.
//!
//! Where no server answers, a test is skipped with a printed reason, unless
//! `LABELHOOK_REQUIRE_SERVICES=1` (set by `.ci/run`), which turns the skip into a failure.

#![allow(dead_code)]

use std::time::Duration;

use async_nats::jetstream;
use futures_util::StreamExt;

pub fn server_url() -> String {
    std::env::var("LABELHOOK_TEST_NATS").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned())
}

fn services_required() -> bool {
    std::env::var("LABELHOOK_REQUIRE_SERVICES").is_ok_and(|v| v == "1")
}

/// A stream name and a subject prefix no other test uses.
pub struct TestStream {
    pub url: String,
    pub stream: String,
    /// Subjects of this stream start with this and a dot.
    pub prefix: String,
    runtime: tokio::runtime::Runtime,
}

/// One message as a consumer sees it.
#[derive(Debug, Clone)]
pub struct Received {
    pub subject: String,
    pub headers: Vec<(String, String)>,
    pub payload: Vec<u8>,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

impl TestStream {
    /// A fresh stream name, or `None` (with the reason printed) where NATS is not running.
    pub fn create(test: &str) -> Option<TestStream> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let url = server_url();
        let reachable = runtime.block_on(async {
            tokio::time::timeout(Duration::from_secs(5), async_nats::connect(url.as_str())).await
        });
        match reachable {
            Ok(Ok(client)) => runtime.block_on(client.drain()).ok(),
            Ok(Err(e)) => return skip(test, &format!("NATS not reachable at {url} ({e})")),
            Err(_) => return skip(test, &format!("NATS not reachable at {url} (timed out)")),
        };
        let tag = format!("{}{:08x}", std::process::id(), fastrand::u32(..));
        Some(TestStream {
            url,
            stream: format!("LHTEST_{tag}"),
            prefix: format!("lhtest{tag}"),
            runtime,
        })
    }

    /// Every message in the stream, oldest first.
    pub fn messages(&self) -> Vec<Received> {
        self.runtime.block_on(async {
            let client = async_nats::connect(self.url.as_str())
                .await
                .expect("connect");
            let js = jetstream::new(client);
            let Ok(mut stream) = js.get_stream(&self.stream).await else {
                return Vec::new();
            };
            let count = stream.info().await.expect("stream info").state.messages;
            let consumer = stream
                .create_consumer(jetstream::consumer::pull::Config::default())
                .await
                .expect("consumer");
            let mut batch = consumer
                .fetch()
                .max_messages(count as usize)
                .expires(Duration::from_secs(2))
                .messages()
                .await
                .expect("fetch");
            let mut received = Vec::new();
            while let Some(message) = batch.next().await {
                let message = message.expect("message");
                let headers = message
                    .headers
                    .iter()
                    .flat_map(|h| h.iter())
                    .flat_map(|(k, vs)| vs.iter().map(move |v| (k.to_string(), v.to_string())))
                    .collect();
                received.push(Received {
                    subject: message.subject.to_string(),
                    headers,
                    payload: message.payload.to_vec(),
                });
            }
            received
        })
    }

    /// The number of messages the stream holds (0 before it exists).
    pub fn count(&self) -> u64 {
        self.runtime.block_on(async {
            let client = async_nats::connect(self.url.as_str())
                .await
                .expect("connect");
            let js = jetstream::new(client);
            match js.get_stream(&self.stream).await {
                Ok(mut stream) => stream.info().await.map_or(0, |i| i.state.messages),
                Err(_) => 0,
            }
        })
    }

    /// The bytes of an object in the stream's body store.
    pub fn object(&self, bucket: &str, name: &str) -> Vec<u8> {
        self.runtime.block_on(async {
            let client = async_nats::connect(self.url.as_str())
                .await
                .expect("connect");
            let js = jetstream::new(client);
            let store = js.get_object_store(bucket).await.expect("object store");
            let mut object = store.get(name).await.expect("object");
            let mut bytes = Vec::new();
            tokio::io::AsyncReadExt::read_to_end(&mut object, &mut bytes)
                .await
                .expect("read object");
            bytes
        })
    }
}

fn skip(test: &str, reason: &str) -> Option<TestStream> {
    assert!(
        !services_required(),
        "{test}: {reason}; LABELHOOK_REQUIRE_SERVICES=1 makes this a failure"
    );
    eprintln!("skipped {test}: {reason}; set LABELHOOK_TEST_NATS to run it");
    None
}

impl Drop for TestStream {
    fn drop(&mut self) {
        let (url, stream) = (self.url.clone(), self.stream.clone());
        self.runtime.block_on(async move {
            if let Ok(client) = async_nats::connect(url.as_str()).await {
                let js = jetstream::new(client);
                let _ = js.delete_stream(&stream).await;
                let _ = js.delete_object_store(format!("{stream}_bodies")).await;
            }
        });
    }
}
