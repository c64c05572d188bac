//! The client-address resolver, fed what a proxy chain (or a liar) can put in front of it.
//! Input, line by line: `xff` or `fwd` (the forwarding header read), the TCP peer, the trusted
//! proxies (comma-separated networks), then one forwarding header line per input line (any
//! bytes HTTP allows).
//!
//! Beyond "never panics": an untrusted peer is the client whatever the headers say; the other
//! forwarding header is never read; with no header the peer is the client; and once the walk
//! reaches an untrusted address, hops a client prepends on the left cannot change it (which
//! is what keeps a spoofed allowed address from being believed).

#![no_main]

use std::net::{IpAddr, Ipv4Addr};

use http::{HeaderMap, HeaderValue};
use ipnet::IpNet;
use labelhook::config::ForwardedHeader;
use labelhook::fuzzing::resolve_client_ip as resolve;
use libfuzzer_sys::fuzz_target;

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

fuzz_target!(|data: &[u8]| {
    let mut lines = data.split(|b| *b == b'\n');
    let kind = lines.next().unwrap_or_default();
    let (header, name, other) = if kind == b"fwd" {
        (ForwardedHeader::Forwarded, "forwarded", "x-forwarded-for")
    } else {
        (
            ForwardedHeader::XForwardedFor,
            "x-forwarded-for",
            "forwarded",
        )
    };
    let text = |line: &[u8]| String::from_utf8_lossy(line).trim().to_owned();
    let peer: IpAddr = text(lines.next().unwrap_or_default())
        .parse()
        .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
    let trusted: Vec<IpNet> = text(lines.next().unwrap_or_default())
        .split(',')
        .filter_map(|net| net.trim().parse().ok())
        .collect();
    let mut headers = HeaderMap::new();
    for line in lines {
        let Ok(value) = HeaderValue::from_bytes(line) else {
            return;
        };
        headers.append(name, value);
    }

    let client = resolve(peer, &headers, &trusted, header);
    let is_trusted = |ip: IpAddr| trusted.iter().any(|net| net.contains(&ip));
    if !is_trusted(canonical(peer)) || headers.is_empty() {
        assert_eq!(client, canonical(peer), "the peer is the client here");
    }
    assert_eq!(client, canonical(client), "a mapped address left unmapped");

    // The header not configured is passed through as the client wrote it: never read.
    let mut with_other = headers.clone();
    with_other.append(other, HeaderValue::from_static("for=192.0.2.1, 192.0.2.2"));
    assert_eq!(resolve(peer, &with_other, &trusted, header), client);

    // A hop prepended on the left (what a client writes before its request reaches the first
    // proxy) is never reached once the walk has stopped at an untrusted address.
    if !is_trusted(client) && !headers.is_empty() {
        let mut prepended = HeaderMap::new();
        let spoof = if header == ForwardedHeader::Forwarded {
            "for=198.51.100.99"
        } else {
            "198.51.100.99"
        };
        prepended.append(name, HeaderValue::from_static(spoof));
        for value in headers.get_all(name) {
            prepended.append(name, value.clone());
        }
        assert_eq!(
            resolve(peer, &prepended, &trusted, header),
            client,
            "a prepended hop changed the client"
        );
    }
});
