//! Who is delivering: the client address behind any trusted proxies, and the allowlist check.
//!
//! The TCP peer is the truth unless it is a trusted proxy. Only then is the forwarding header
//! the proxies maintain (`network.forwarded_header`: `X-Forwarded-For` or `Forwarded`, never
//! both: a proxy passes the other through as the client wrote it) read from the right (the hop
//! nearest to us), skipping trusted proxies; the first untrusted address is the client. A header
//! sent by an untrusted peer is ignored, since anyone can write one. An unparsable hop (or a
//! header line that is not text) ends the walk at the last trusted address reached, so a
//! malformed header can never make an untrusted client look allowed.

use std::net::IpAddr;

use axum::http::HeaderMap;
use ipnet::IpNet;

use super::settings::ForwardedHeader;

/// The client address of a request.
pub fn resolve(
    peer: IpAddr,
    headers: &HeaderMap,
    trusted_proxies: &[IpNet],
    header: ForwardedHeader,
) -> IpAddr {
    let peer = canonical(peer);
    let is_trusted = |ip: IpAddr| trusted_proxies.iter().any(|net| net.contains(&ip));
    if !is_trusted(peer) {
        return peer;
    }
    // Hops as written by the proxies, left (oldest) to right (nearest).
    let hops = match header {
        ForwardedHeader::XForwardedFor => x_forwarded_for_hops(headers),
        ForwardedHeader::Forwarded => forwarded_hops(headers),
    };
    let mut client = peer;
    for hop in hops.iter().rev() {
        match hop {
            Some(ip) => {
                client = canonical(*ip);
                if !is_trusted(client) {
                    return client;
                }
            }
            None => return client,
        }
    }
    client
}

/// Hops of RFC 7239 `Forwarded`, oldest first. `None` marks a hop that could not be read
/// (obfuscated identifiers, garbage, a line that is not text).
fn forwarded_hops(headers: &HeaderMap) -> Vec<Option<IpAddr>> {
    header_lines(headers, "forwarded")
        .flat_map(|line| match line {
            None => vec![None],
            Some(line) => line
                .split(',')
                .map(|element| {
                    element
                        .split(';')
                        .filter_map(|pair| pair.split_once('='))
                        .find(|(k, _)| k.trim().eq_ignore_ascii_case("for"))
                        .and_then(|(_, v)| parse_node(v.trim().trim_matches('"')))
                })
                .collect(),
        })
        .collect()
}

/// Hops of `X-Forwarded-For`, oldest first, `None` for what could not be read.
fn x_forwarded_for_hops(headers: &HeaderMap) -> Vec<Option<IpAddr>> {
    header_lines(headers, "x-forwarded-for")
        .flat_map(|line| match line {
            None => vec![None],
            Some(line) => line.split(',').map(|hop| parse_node(hop.trim())).collect(),
        })
        .collect()
}

/// Every line of a header, `None` for a line that is not visible ASCII.
fn header_lines<'a>(
    headers: &'a HeaderMap,
    name: &'static str,
) -> impl Iterator<Item = Option<&'a str>> {
    headers.get_all(name).iter().map(|v| v.to_str().ok())
}

/// An address, possibly with a port: `1.2.3.4`, `1.2.3.4:80`, `[::1]`, `[::1]:80`, `::1`.
fn parse_node(text: &str) -> Option<IpAddr> {
    if let Ok(ip) = text.parse() {
        return Some(ip);
    }
    if let Some(rest) = text.strip_prefix('[') {
        return rest.split(']').next()?.parse().ok();
    }
    let (host, _port) = text.rsplit_once(':')?;
    host.parse().ok()
}

/// `::ffff:1.2.3.4` is the IPv4 client 1.2.3.4 on a dual-stack socket.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// The source addresses allowed to deliver.
#[derive(Debug, Clone)]
pub struct Allowlist {
    nets: Vec<IpNet>,
    allow_all: bool,
}

impl Allowlist {
    pub fn new(nets: Vec<IpNet>, allow_all: bool) -> Self {
        Self { nets, allow_all }
    }

    pub fn allows(&self, ip: IpAddr) -> bool {
        self.allow_all || self.nets.iter().any(|net| net.contains(&canonical(ip)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| s.parse().expect("cidr")).collect()
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(*k, HeaderValue::from_static(v));
        }
        map
    }

    /// (peer, headers, trusted proxies, expected client)
    type Case = (
        &'static str,
        &'static [(&'static str, &'static str)],
        &'static [&'static str],
        &'static str,
    );

    #[test]
    fn client_ip_resolution_table() {
        let cases: &[Case] = &[
            // No proxy configured: the peer, whatever the headers claim.
            ("35.223.142.181", &[], &[], "35.223.142.181"),
            (
                "203.0.113.9",
                &[("x-forwarded-for", "35.223.142.181")],
                &[],
                "203.0.113.9",
            ),
            // Untrusted peer: its headers are ignored.
            (
                "203.0.113.9",
                &[("x-forwarded-for", "35.223.142.181")],
                &["10.0.0.0/8"],
                "203.0.113.9",
            ),
            // Trusted peer: the rightmost untrusted hop.
            (
                "10.0.0.5",
                &[("x-forwarded-for", "35.223.142.181")],
                &["10.0.0.0/8"],
                "35.223.142.181",
            ),
            (
                "10.0.0.5",
                &[("x-forwarded-for", "1.1.1.1, 35.223.142.181, 10.0.0.7")],
                &["10.0.0.0/8"],
                "35.223.142.181",
            ),
            // A spoofed leftmost entry does not win.
            (
                "10.0.0.5",
                &[("x-forwarded-for", "35.223.142.181, 198.51.100.1")],
                &["10.0.0.0/8"],
                "198.51.100.1",
            ),
            // Several header lines are one list, in order.
            (
                "10.0.0.5",
                &[
                    ("x-forwarded-for", "35.223.142.181"),
                    ("x-forwarded-for", "10.0.0.9"),
                ],
                &["10.0.0.0/8"],
                "35.223.142.181",
            ),
            // Trusted proxy with no header: the proxy itself.
            ("10.0.0.5", &[], &["10.0.0.0/8"], "10.0.0.5"),
            // All hops trusted: the leftmost.
            (
                "10.0.0.5",
                &[("x-forwarded-for", "10.0.0.8, 10.0.0.9")],
                &["10.0.0.0/8"],
                "10.0.0.8",
            ),
            // Garbage stops the walk at the last trusted address reached.
            (
                "10.0.0.5",
                &[("x-forwarded-for", "35.223.142.181, garbage")],
                &["10.0.0.0/8"],
                "10.0.0.5",
            ),
            // Ports and IPv6 forms.
            (
                "10.0.0.5",
                &[("x-forwarded-for", "35.223.142.181:4711")],
                &["10.0.0.0/8"],
                "35.223.142.181",
            ),
            (
                "::1",
                &[("x-forwarded-for", "[2001:db8::1]:443")],
                &["::1/128"],
                "2001:db8::1",
            ),
            // RFC 7239 Forwarded wins over X-Forwarded-For.
            (
                "10.0.0.5",
                &[
                    ("forwarded", "for=35.223.142.181;proto=https"),
                    ("x-forwarded-for", "198.51.100.1"),
                ],
                &["10.0.0.0/8"],
                "35.223.142.181",
            ),
            (
                "10.0.0.5",
                &[("forwarded", "for=\"[2001:db8::2]:80\", for=10.0.0.3")],
                &["10.0.0.0/8"],
                "2001:db8::2",
            ),
            (
                "10.0.0.5",
                &[("forwarded", "for=_hidden, for=10.0.0.3")],
                &["10.0.0.0/8"],
                "10.0.0.3",
            ),
            // IPv4-mapped peers are IPv4 clients.
            (
                "::ffff:10.0.0.5",
                &[("x-forwarded-for", "35.223.142.181")],
                &["10.0.0.0/8"],
                "35.223.142.181",
            ),
        ];
        for (peer, hdrs, trusted, expected) in cases {
            let which = if hdrs.iter().any(|(k, _)| *k == "forwarded") {
                ForwardedHeader::Forwarded
            } else {
                ForwardedHeader::XForwardedFor
            };
            let got = resolve(ip(peer), &headers(hdrs), &nets(trusted), which);
            assert_eq!(
                got,
                ip(expected),
                "peer {peer} headers {hdrs:?} trusted {trusted:?}"
            );
        }
    }

    #[test]
    fn the_header_the_proxy_does_not_maintain_is_ignored() {
        // The proxy appends to X-Forwarded-For and passes the client's own Forwarded through.
        let spoofed = headers(&[
            ("forwarded", "for=35.223.142.181"),
            ("x-forwarded-for", "198.51.100.7"),
        ]);
        let trusted = nets(&["10.0.0.0/8"]);
        let got = resolve(
            ip("10.0.0.5"),
            &spoofed,
            &trusted,
            ForwardedHeader::XForwardedFor,
        );
        assert_eq!(got, ip("198.51.100.7"));
    }

    #[test]
    fn a_line_that_is_not_text_stops_the_walk() {
        let mut map = HeaderMap::new();
        map.append(
            "x-forwarded-for",
            HeaderValue::from_static("35.223.142.181"),
        );
        map.append(
            "x-forwarded-for",
            HeaderValue::from_bytes(b"\xff junk, 10.0.0.7").expect("opaque header"),
        );
        let trusted = nets(&["10.0.0.0/8"]);
        let got = resolve(
            ip("10.0.0.5"),
            &map,
            &trusted,
            ForwardedHeader::XForwardedFor,
        );
        assert_eq!(got, ip("10.0.0.5"));
    }

    #[test]
    fn allowlist_matches_cidrs_and_mapped_addresses() {
        let list = Allowlist::new(nets(&["35.223.142.181/32", "10.1.0.0/16"]), false);
        assert!(list.allows(ip("35.223.142.181")));
        assert!(list.allows(ip("::ffff:35.223.142.181")));
        assert!(list.allows(ip("10.1.200.3")));
        assert!(!list.allows(ip("35.223.142.182")));
        assert!(!list.allows(ip("127.0.0.1")));
        assert!(Allowlist::new(Vec::new(), true).allows(ip("127.0.0.1")));
    }
}
