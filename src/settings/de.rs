//! Field deserializers with strict types and messages that show the value they refused:
//! durations (`"300s"`, never a bare number), CIDRs and socket addresses.
//!
//! None of these is used under a secret's key, so showing the value is safe; the loader
//! hides the value of anything under `secrets`, `password`, `token` or `credentials`.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use ipnet::IpNet;
use serde::de::{self, Deserialize, Deserializer, Visitor};

/// What a duration looks like, in every message about one.
const DURATION_EXAMPLE: &str = "a duration like \"300s\"";

/// `#[serde(with = "de::duration")]`: `"10s"`, `"250ms"`, `"1h 30m"`. A bare number is an
/// error, since it is not clear whether it means seconds or milliseconds.
pub mod duration {
    use super::*;

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        deserializer.deserialize_any(DurationVisitor)
    }

    /// `#[serde(default, with = "de::duration::option")]`: absent is `None`.
    pub mod option {
        use super::*;

        pub fn deserialize<'de, D: Deserializer<'de>>(
            deserializer: D,
        ) -> Result<Option<Duration>, D::Error> {
            super::deserialize(deserializer).map(Some)
        }
    }
}

struct DurationVisitor;

impl Visitor<'_> for DurationVisitor {
    type Value = Duration;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(DURATION_EXAMPLE)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
        humantime::parse_duration(v)
            .map_err(|e| E::custom(format!("expected {DURATION_EXAMPLE}, got {v:?} ({e})")))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Duration, E> {
        Err(E::custom(format!("expected {DURATION_EXAMPLE}, got {v}")))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Duration, E> {
        Err(E::custom(format!("expected {DURATION_EXAMPLE}, got {v}")))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Duration, E> {
        Err(E::custom(format!("expected {DURATION_EXAMPLE}, got {v}")))
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Duration, E> {
        Err(E::custom(format!("expected {DURATION_EXAMPLE}, got {v}")))
    }
}

/// A list of CIDRs (`network.allowlist` and the like); a bad entry is named with its value.
/// IPv4-mapped IPv6 entries are taken as the IPv4 networks they stand for ([`unmapped`]).
pub fn cidrs<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<IpNet>, D::Error> {
    let list = Vec::<Cidr>::deserialize(deserializer)?;
    Ok(list.into_iter().map(|c| unmapped(c.0)).collect())
}

/// `::ffff:192.0.2.7/128` as `192.0.2.7/32`, `::ffff:10.0.0.0/104` as `10.0.0.0/8`.
///
/// A dual-stack listener sees an IPv4 client as `::ffff:a.b.c.d`, and the ingress turns that
/// into the IPv4 address before any check (`ingress::client_ip`), so an entry written in the
/// mapped form would never match anyone. Networks of less than /96 are left as written: they
/// are not the mapped form of one IPv4 network.
fn unmapped(net: IpNet) -> IpNet {
    let IpNet::V6(v6) = net else { return net };
    match (v6.addr().to_ipv4_mapped(), v6.prefix_len().checked_sub(96)) {
        (Some(v4), Some(len)) => ipnet::Ipv4Net::new(v4, len).map_or(net, IpNet::V4),
        _ => net,
    }
}

struct Cidr(IpNet);

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(CidrVisitor)
    }
}

struct CidrVisitor;

impl Visitor<'_> for CidrVisitor {
    type Value = Cidr;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a CIDR like \"10.0.0.0/8\" or \"192.0.2.7/32\"")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Cidr, E> {
        v.parse().map(Cidr).map_err(|_| {
            let hint = if v.parse::<std::net::IpAddr>().is_ok() {
                " (an address needs its prefix length: /32 for one IPv4 address, /128 for IPv6)"
            } else {
                ""
            };
            E::custom(format!(
                "expected a CIDR like \"10.0.0.0/8\" or \"192.0.2.7/32\", got {v:?}{hint}"
            ))
        })
    }
}

/// `server.listen`: an IP address and a port.
pub fn socket_addr<'de, D: Deserializer<'de>>(deserializer: D) -> Result<SocketAddr, D::Error> {
    deserializer.deserialize_any(SocketAddrVisitor)
}

struct SocketAddrVisitor;

impl Visitor<'_> for SocketAddrVisitor {
    type Value = SocketAddr;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an address and port like \"0.0.0.0:8080\"")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<SocketAddr, E> {
        v.parse().map_err(|_| {
            E::custom(format!(
                "expected an IP address and port like \"0.0.0.0:8080\" or \"[::1]:8080\", got {v:?}"
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(text: &str) -> IpNet {
        text.parse().expect("cidr")
    }

    #[test]
    fn ipv4_mapped_networks_become_the_ipv4_networks_they_stand_for() {
        for (written, taken) in [
            ("::ffff:127.0.0.1/128", "127.0.0.1/32"),
            ("::ffff:10.0.0.0/104", "10.0.0.0/8"),
            ("::ffff:0.0.0.0/96", "0.0.0.0/0"),
            // Not the mapped form of an IPv4 network: as written.
            ("::ffff:0.0.0.0/95", "::ffff:0.0.0.0/95"),
            ("2001:db8::/32", "2001:db8::/32"),
            ("::1/128", "::1/128"),
            ("192.0.2.0/24", "192.0.2.0/24"),
        ] {
            assert_eq!(unmapped(net(written)), net(taken), "{written}");
        }
    }
}
