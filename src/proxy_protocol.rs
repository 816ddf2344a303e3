//! The PROXY protocol (HAProxy's v1 text and v2 binary headers): the
//! client address an L4 balancer in front of sluice carries in front of
//! the TCP stream, and the one sluice writes to backends that want it.
//!
//! Owns reading exactly the header's bytes off a new connection (nothing
//! of the TLS or HTTP that follows), deciding what the header says
//! ([`parse`], pure), and building the header for a backend ([`header`]).
//! The byte formats themselves are the `ppp` crate's. A leaf: it imports
//! nothing else of sluice.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use ppp::v2;
use ppp::{HeaderResult, PartialResult};
use tokio::io::{AsyncReadExt, Interest};
use tokio::net::TcpStream;

/// The longest header sluice reads: a v1 header is at most 107 bytes; a
/// v2 header from an L4 balancer with TLS fields well under 1 KiB.
pub const MAX_HEADER: usize = 4096;

/// The longest v1 header, CRLF included (the specification's bound).
const V1_MAX: usize = 107;

/// A v2 header's fixed part: signature, version and command, family and
/// protocol, length of the rest.
const V2_FIXED: usize = 16;

/// What is peeked first: a v1 header, or a v2 one with a few TLVs.
const FIRST_PEEK: usize = 256;

/// Which headers a listener accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accept {
    V1,
    V2,
    Any,
}

/// Which header sluice sends to a pool's backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

/// What a header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carried {
    /// A proxied connection: the client's address and the one it connected to.
    Proxied {
        source: SocketAddr,
        destination: SocketAddr,
    },
    /// The L4 balancer's own connection (`LOCAL`, e.g. a health check) or
    /// one of an unknown family: the real peer address stands.
    Local,
}

/// The outcome of looking at the first bytes of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// A whole header of `len` bytes.
    Complete { len: usize, carried: Carried },
    /// A header may follow once more bytes arrive.
    Incomplete,
    /// Not an acceptable header.
    Invalid(String),
}

/// Why a connection's header was refused.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("peer {peer} is not in proxy_protocol_from")]
    NotAllowed { peer: SocketAddr },
    #[error("reading the PROXY header")]
    Io { source: io::Error },
    #[error("the connection ended inside the PROXY header")]
    Truncated,
    #[error("no complete PROXY header within {timeout:?}")]
    Timeout { timeout: Duration },
    #[error("invalid PROXY header: {reason}")]
    Invalid { reason: String },
}

/// What `bytes`, the start of a connection, hold: a header `accept`
/// allows, not enough bytes yet, or anything else.
pub fn parse(bytes: &[u8], accept: Accept) -> Parsed {
    let looks_v2 = v2::PROTOCOL_PREFIX.starts_with(&bytes[..bytes.len().min(12)]);
    let looks_v1 = b"PROXY ".starts_with(&bytes[..bytes.len().min(6)]);
    match (accept, looks_v1, looks_v2) {
        (_, false, false) => return Parsed::Invalid("no PROXY protocol signature".into()),
        (Accept::V1, false, _) => {
            return Parsed::Invalid("a v2 header where v1 is configured".into());
        }
        (Accept::V2, _, false) => {
            return Parsed::Invalid("a v1 header where v2 is configured".into());
        }
        _ => {}
    }
    // Where the header ends is found here, and only a whole header is
    // given to `ppp` (whose v1 parser calls a cut-off line invalid).
    let header = if looks_v1 && bytes.len() >= 6 {
        let Some(end) = bytes[..bytes.len().min(V1_MAX)]
            .windows(2)
            .position(|w| w == b"\r\n")
        else {
            return if bytes.len() >= V1_MAX {
                Parsed::Invalid(format!("a v1 header longer than {V1_MAX} bytes"))
            } else {
                Parsed::Incomplete
            };
        };
        HeaderResult::from(ppp::v1::Header::try_from(&bytes[..end + 2]))
    } else {
        if bytes.len() < V2_FIXED {
            return Parsed::Incomplete;
        }
        let total = V2_FIXED + usize::from(u16::from_be_bytes([bytes[14], bytes[15]]));
        if total > MAX_HEADER {
            return Parsed::Invalid(format!(
                "a v2 header of {total} bytes (at most {MAX_HEADER})"
            ));
        }
        if bytes.len() < total {
            return Parsed::Incomplete;
        }
        HeaderResult::from(v2::Header::try_from(&bytes[..total]))
    };
    if header.is_incomplete() {
        return Parsed::Invalid("a header that does not parse".into());
    }
    match header {
        HeaderResult::V1(Ok(h)) => Parsed::Complete {
            len: h.header.len(),
            carried: match h.addresses {
                ppp::v1::Addresses::Tcp4(a) => Carried::Proxied {
                    source: SocketAddr::from((a.source_address, a.source_port)),
                    destination: SocketAddr::from((a.destination_address, a.destination_port)),
                },
                ppp::v1::Addresses::Tcp6(a) => Carried::Proxied {
                    source: SocketAddr::from((a.source_address, a.source_port)),
                    destination: SocketAddr::from((a.destination_address, a.destination_port)),
                },
                ppp::v1::Addresses::Unknown => Carried::Local,
            },
        },
        HeaderResult::V2(Ok(h))
            if h.command == v2::Command::Proxy && h.protocol == v2::Protocol::Datagram =>
        {
            Parsed::Invalid("a datagram (UDP) header on a stream".into())
        }
        HeaderResult::V2(Ok(h)) => Parsed::Complete {
            len: h.len(),
            carried: match (h.command, h.addresses) {
                (v2::Command::Local, _) => Carried::Local,
                // UNSPEC protocol: no stream to speak of.
                (v2::Command::Proxy, _) if h.protocol != v2::Protocol::Stream => Carried::Local,
                (v2::Command::Proxy, v2::Addresses::IPv4(a)) => Carried::Proxied {
                    source: SocketAddr::from((a.source_address, a.source_port)),
                    destination: SocketAddr::from((a.destination_address, a.destination_port)),
                },
                (v2::Command::Proxy, v2::Addresses::IPv6(a)) => Carried::Proxied {
                    source: SocketAddr::from((a.source_address, a.source_port)),
                    destination: SocketAddr::from((a.destination_address, a.destination_port)),
                },
                // UNSPEC or a UNIX socket: no IP address to use.
                (v2::Command::Proxy, _) => Carried::Local,
            },
        },
        HeaderResult::V1(Err(e)) => Parsed::Invalid(e.to_string()),
        HeaderResult::V2(Err(e)) => Parsed::Invalid(e.to_string()),
    }
}

/// Reads the header at the start of `stream` within `timeout`, consuming
/// exactly its bytes. Bytes are peeked until a whole header is there, so
/// what follows it (a TLS ClientHello, an HTTP request) stays in the
/// socket for whoever reads next.
pub async fn read_header(
    stream: &mut TcpStream,
    accept: Accept,
    timeout: Duration,
) -> Result<Carried, ProxyError> {
    let read = async {
        // On the heap and only while reading: a connection's task does
        // not carry it for its whole life. Most headers fit the first
        // size; a v2 header with long TLVs gets what its length asks for.
        let mut buf = vec![0u8; FIRST_PEEK];
        let mut closed = false;
        loop {
            let n = stream
                .peek(&mut buf)
                .await
                .map_err(|source| ProxyError::Io { source })?;
            match parse(&buf[..n], accept) {
                Parsed::Complete { len, carried } => {
                    stream
                        .read_exact(&mut buf[..len])
                        .await
                        .map_err(|source| ProxyError::Io { source })?;
                    return Ok(carried);
                }
                Parsed::Invalid(reason) => return Err(ProxyError::Invalid { reason }),
                Parsed::Incomplete if n == 0 || closed => {
                    return Err(ProxyError::Truncated);
                }
                Parsed::Incomplete if n == buf.len() => {
                    // Only a v2 header gets here (a v1 one is shorter);
                    // parse() has checked its length against MAX_HEADER.
                    buf.resize(MAX_HEADER, 0);
                }
                Parsed::Incomplete => {
                    // The bytes so far keep the socket readable: forget
                    // that, and wait for more bytes or the peer's end
                    // (a peek in a loop would spin).
                    let _ = stream.try_io(Interest::READABLE, || {
                        Err::<(), _>(io::ErrorKind::WouldBlock.into())
                    });
                    let ready = stream
                        .ready(Interest::READABLE)
                        .await
                        .map_err(|source| ProxyError::Io { source })?;
                    // tokio keeps "read closed" once seen: the next peek
                    // then has all there will ever be.
                    closed = ready.is_read_closed();
                }
            }
        }
    };
    tokio::time::timeout(timeout, read)
        .await
        .unwrap_or(Err(ProxyError::Timeout { timeout }))
}

/// The client of one connection, as a backend's PROXY header describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Client {
    /// The client's address (carried by a PROXY header in front of sluice,
    /// else the peer's).
    pub addr: SocketAddr,
    /// The address the client connected to.
    pub local: SocketAddr,
    /// The client spoke TLS to sluice: with the SNI name it sent, if any.
    pub tls: Option<Option<std::sync::Arc<str>>>,
}

/// PP2_CLIENT_SSL: the client connected over TLS.
const PP2_CLIENT_SSL: u8 = 0x01;

/// The header that tells a backend about `client`. v2 also carries, for a
/// TLS client, `PP2_TYPE_SSL` (client over TLS, no client certificate:
/// verify non-zero) and `PP2_TYPE_AUTHORITY` (the SNI name).
pub fn header(client: &Client, version: Version) -> Vec<u8> {
    // Both addresses of one family: an IPv4 client to an IPv6 listener
    // is described as IPv6 (mapped).
    let (source, destination) = same_family(client.addr, client.local);
    match version {
        Version::V1 => ppp::v1::Addresses::from((source, destination))
            .to_string()
            .into_bytes(),
        Version::V2 => {
            let mut builder = v2::Builder::with_addresses(
                v2::Version::Two | v2::Command::Proxy,
                v2::Protocol::Stream,
                (source, destination),
            );
            let mut tlvs: Vec<(u8, Vec<u8>)> = Vec::new();
            if let Some(sni) = &client.tls {
                if let Some(name) = sni {
                    tlvs.push((v2::Type::Authority.into(), name.as_bytes().to_vec()));
                }
                // Client flags, then the 32-bit verify result: zero only
                // for a client certificate that was verified, and sluice
                // asks for none.
                tlvs.push((v2::Type::SSL.into(), vec![PP2_CLIENT_SSL, 0, 0, 0, 1]));
            }
            for (kind, value) in &tlvs {
                builder = builder
                    .write_tlv(*kind, value)
                    .expect("writing to a Vec does not fail");
            }
            builder.build().expect("writing to a Vec does not fail")
        }
    }
}

/// The header of sluice's own connections (health checks): v1 `UNKNOWN`,
/// v2 `LOCAL`. The backend then takes the peer address as it is.
pub fn local_header(version: Version) -> Vec<u8> {
    match version {
        Version::V1 => b"PROXY UNKNOWN\r\n".to_vec(),
        Version::V2 => v2::Builder::new(
            v2::Version::Two | v2::Command::Local,
            v2::AddressFamily::Unspecified | v2::Protocol::Unspecified,
        )
        .build()
        .expect("writing to a Vec does not fail"),
    }
}

fn same_family(a: SocketAddr, b: SocketAddr) -> (SocketAddr, SocketAddr) {
    // IPv4 clients of a dual-stack listener arrive IPv4-mapped: they are
    // IPv4 clients (as in X-Forwarded-For).
    let canonical = |s: SocketAddr| SocketAddr::new(s.ip().to_canonical(), s.port());
    let (a, b) = (canonical(a), canonical(b));
    match (a, b) {
        (SocketAddr::V4(_), SocketAddr::V4(_)) | (SocketAddr::V6(_), SocketAddr::V6(_)) => (a, b),
        (SocketAddr::V4(v4), SocketAddr::V6(_)) => (
            SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port()),
            b,
        ),
        (SocketAddr::V6(_), SocketAddr::V4(v4)) => (
            a,
            SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port()),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("address")
    }

    const V1: &[u8] = b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 443\r\nGET / HTTP/1.1\r\n";

    #[test]
    fn v1_gives_the_client_and_its_length() {
        assert_eq!(
            parse(V1, Accept::V1),
            Parsed::Complete {
                len: 45,
                carried: Carried::Proxied {
                    source: addr("192.0.2.7:56324"),
                    destination: addr("198.51.100.1:443"),
                }
            }
        );
        assert_eq!(
            parse(b"PROXY UNKNOWN\r\n", Accept::Any),
            Parsed::Complete {
                len: 15,
                carried: Carried::Local
            }
        );
        let v6 = b"PROXY TCP6 2001:db8::1 2001:db8::2 1000 443\r\n";
        assert!(matches!(
            parse(v6, Accept::Any),
            Parsed::Complete { carried: Carried::Proxied { source, .. }, .. } if source == addr("[2001:db8::1]:1000")
        ));
    }

    #[test]
    fn v2_round_trips_with_tls_fields() {
        let client = Client {
            addr: addr("203.0.113.9:40000"),
            local: addr("10.0.0.1:443"),
            tls: Some(Some("chat.example.com".into())),
        };
        let bytes = header(&client, Version::V2);
        let parsed = v2::Header::try_from(bytes.as_slice()).expect("valid v2");
        let tlvs: Vec<(u8, Vec<u8>)> = parsed
            .tlvs()
            .map(|t| t.expect("tlv"))
            .map(|t| (t.kind, t.value.to_vec()))
            .collect();
        assert!(tlvs.contains(&(0x02, b"chat.example.com".to_vec())));
        assert!(tlvs.contains(&(0x20, vec![1, 0, 0, 0, 1])));
        let mut with_data = bytes.clone();
        with_data.extend_from_slice(b"\x16\x03\x01");
        assert_eq!(
            parse(&with_data, Accept::V2),
            Parsed::Complete {
                len: bytes.len(),
                carried: Carried::Proxied {
                    source: client.addr,
                    destination: client.local
                }
            }
        );
        let v1 = header(&client, Version::V1);
        assert_eq!(v1, b"PROXY TCP4 203.0.113.9 10.0.0.1 40000 443\r\n");
    }

    #[test]
    fn v2_local_keeps_the_peer_address() {
        assert_eq!(
            parse(&local_header(Version::V1), Accept::V1),
            Parsed::Complete {
                len: 15,
                carried: Carried::Local
            }
        );
        let bytes = local_header(Version::V2);
        assert_eq!(
            parse(&bytes, Accept::Any),
            Parsed::Complete {
                len: 16,
                carried: Carried::Local
            }
        );
    }

    #[test]
    fn partial_wrong_and_foreign_bytes() {
        assert_eq!(parse(&V1[..20], Accept::V1), Parsed::Incomplete);
        assert_eq!(parse(b"PRO", Accept::Any), Parsed::Incomplete);
        assert_eq!(parse(b"", Accept::Any), Parsed::Incomplete);
        assert!(matches!(parse(V1, Accept::V2), Parsed::Invalid(_)));
        let v2 = header(
            &Client {
                addr: addr("192.0.2.1:1"),
                local: addr("192.0.2.2:2"),
                tls: None,
            },
            Version::V2,
        );
        assert!(matches!(parse(&v2, Accept::V1), Parsed::Invalid(_)));
        assert_eq!(parse(&v2[..10], Accept::V2), Parsed::Incomplete);
        assert!(matches!(
            parse(b"GET / HTTP/1.1\r\n", Accept::Any),
            Parsed::Invalid(_)
        ));
        assert!(matches!(
            parse(b"PROXY TCP4 999.0.0.1 1.1.1.1 1 2\r\n", Accept::Any),
            Parsed::Invalid(_)
        ));
        // A v1 line that never ends is refused at 107 bytes, not read on.
        let long = [b"PROXY TCP4 ".as_slice(), &[b'1'; 200]].concat();
        assert!(matches!(parse(&long, Accept::Any), Parsed::Invalid(_)));
    }

    #[test]
    fn ipv4_mapped_clients_are_sent_as_ipv4() {
        let client = Client {
            addr: addr("[::ffff:192.0.2.7]:5000"),
            local: addr("[::ffff:10.0.0.1]:443"),
            tls: None,
        };
        assert_eq!(
            header(&client, Version::V1),
            b"PROXY TCP4 192.0.2.7 10.0.0.1 5000 443\r\n"
        );
    }

    #[test]
    fn a_udp_header_is_refused() {
        let udp = v2::Builder::with_addresses(
            v2::Version::Two | v2::Command::Proxy,
            v2::Protocol::Datagram,
            (addr("192.0.2.1:1"), addr("192.0.2.2:2")),
        )
        .build()
        .expect("build");
        assert!(matches!(parse(&udp, Accept::Any), Parsed::Invalid(_)));
    }

    #[test]
    fn a_mixed_family_client_is_sent_as_ipv6() {
        let client = Client {
            addr: addr("192.0.2.7:5000"),
            local: addr("[::1]:443"),
            tls: None,
        };
        assert_eq!(
            header(&client, Version::V1),
            b"PROXY TCP6 ::ffff:192.0.2.7 ::1 5000 443\r\n"
        );
    }

    fn cases() -> u32 {
        std::env::var("SLUICE_PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(512)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(cases()))]

        /// Arbitrary bytes never panic, and a complete header never claims
        /// more bytes than it was given.
        #[test]
        fn arbitrary_bytes_are_answered(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            for accept in [Accept::V1, Accept::V2, Accept::Any] {
                if let Parsed::Complete { len, .. } = parse(&bytes, accept) {
                    prop_assert!(len <= bytes.len());
                }
            }
        }

        /// Arbitrary bytes behind a valid signature (where the parsing
        /// is) never panic, and never claim more than they hold.
        #[test]
        fn arbitrary_bytes_after_a_signature_are_answered(
            v2 in any::<bool>(), tail in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            let mut bytes = if v2 { v2::PROTOCOL_PREFIX.to_vec() } else { b"PROXY ".to_vec() };
            bytes.extend_from_slice(&tail);
            if let Parsed::Complete { len, .. } = parse(&bytes, Accept::Any) {
                prop_assert!(len <= bytes.len());
            }
        }

        /// Every header sluice writes parses back to the same client, at
        /// any split: a prefix is incomplete, the whole is complete.
        #[test]
        fn written_headers_parse_back_at_every_split(
            a in any::<[u8; 4]>(), b in any::<[u8; 4]>(), pa in 1u16.., pb in 1u16..,
            v6 in any::<bool>(), v2 in any::<bool>(), sni in proptest::option::of("[a-z]{1,20}"),
        ) {
            let to = |ip: [u8; 4], port| if v6 {
                SocketAddr::new(std::net::Ipv6Addr::from([ip, ip, ip, ip].concat().try_into().unwrap_or([0; 16])).into(), port)
            } else {
                SocketAddr::from((ip, port))
            };
            let client = Client { addr: to(a, pa), local: to(b, pb), tls: Some(sni.map(Into::into)) };
            let version = if v2 { Version::V2 } else { Version::V1 };
            let bytes = header(&client, version);
            for cut in 0..bytes.len() {
                prop_assert_eq!(parse(&bytes[..cut], Accept::Any), Parsed::Incomplete, "cut {}", cut);
            }
            prop_assert_eq!(
                parse(&bytes, Accept::Any),
                Parsed::Complete { len: bytes.len(), carried: Carried::Proxied { source: client.addr, destination: client.local } }
            );
        }
    }
}
