//! Micro-benchmarks of the pure steps every delivery goes through: HMAC verification while the
//! body streams in, parsing into a typed event, and the ordering gate's decision.
//! Run with `cargo bench --bench pipeline`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use labelhook::events;
use labelhook::ordering::{decide, Applied, Change, Version};
use labelhook::test_support::delivery::signature::sign;
use labelhook::test_support::delivery::{Algorithm, BodyVerifier, ClaimedSignature};
use secrecy::SecretString;

const SMALL: &[u8] = include_bytes!("../tests/fixtures/label_updated.json");

/// A v1 LABEL_UPDATED body of about `size` bytes (the label string grows with annotations).
fn label_body(size: usize) -> Vec<u8> {
    let object = r#"{\"featureId\":\"cfeat\",\"title\":\"car\",\"bbox\":{\"top\":1,\"left\":2,\"height\":3,\"width\":4}},"#;
    let mut label = String::new();
    while label.len() < size {
        label.push_str(object);
    }
    format!(
        r#"{{"id":"clabelbench00000000000001","updatedAt":"2026-11-20T10:00:00.123Z","project":{{"id":"cproj"}},"dataRow":{{"id":"cdrow"}},"label":"{{\"objects\":[{label}{{}}]}}"}}"#
    )
    .into_bytes()
}

fn verify(c: &mut Criterion) {
    let secrets = [SecretString::from("bench-secret".to_owned())];
    let mut group = c.benchmark_group("verify_hmac_sha1");
    for size in [2 * 1024, 300 * 1024, 4 * 1024 * 1024] {
        let body = label_body(size);
        let header = sign(b"bench-secret", &body, Algorithm::Sha1);
        let claimed = ClaimedSignature::pick(None, Some(header.as_bytes()), true)
            .unwrap_or_else(|_| unreachable!("a valid header"));
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_with_input(BenchmarkId::from_parameter(body.len()), &body, |b, body| {
            b.iter(|| {
                // As the ingress does: fed in 64 KiB chunks, as hyper hands them over.
                let mut verifier = BodyVerifier::new(claimed.algorithm, &secrets);
                for chunk in body.chunks(64 * 1024) {
                    verifier.update(chunk);
                }
                verifier.verify(&claimed)
            })
        });
    }
    group.finish();
}

fn parse(c: &mut Criterion) {
    let mut group = c.benchmark_group("parse_label_updated");
    for body in [SMALL.to_vec(), label_body(300 * 1024)] {
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_with_input(BenchmarkId::new("slice", body.len()), &body, |b, body| {
            b.iter(|| events::parse(Some("LABEL_UPDATED"), body))
        });
        group.bench_with_input(BenchmarkId::new("reader", body.len()), &body, |b, body| {
            b.iter(|| events::parse_reader(Some("LABEL_UPDATED"), &body[..]))
        });
    }
    group.finish();
}

fn gate(c: &mut Criterion) {
    let last = Applied {
        version: Version::parse_rfc3339("2026-11-20T10:00:00Z"),
        change: Change::Updated,
        backfilled: false,
    };
    let newer = Version::parse_rfc3339("2026-11-20T10:00:01Z");
    c.bench_function("gate_decide", |b| {
        b.iter(|| decide(Some(&last), newer, Change::Updated))
    });
}

criterion_group!(benches, verify, parse, gate);
criterion_main!(benches);
