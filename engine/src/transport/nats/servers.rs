//! A list of NATS servers as people write it: one URL, or a comma-separated
//! seed list (`nats://n1:4222,nats://n2:4222,n3:4222`), the NATS convention
//! for `NATS_URL`, the `nats` CLI and every official client.
//!
//! Every entry is handed to the client, which connects to any live one (it
//! tries them all at connect, and reconnects to any of them, and to the
//! servers the cluster tells it about, later). An entry without a scheme is
//! `nats://`; one without a port is on 4222. A wrong entry is refused with
//! its position and why, and passwords and tokens in it are never repeated.

use std::fmt;
use std::str::FromStr;

use async_nats::ServerAddr;

/// One or more NATS servers, parsed from a URL or a comma-separated list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerList(Vec<ServerAddr>);

/// Why a server list was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServerListError {
    #[error("no NATS server given: expected a URL such as nats://127.0.0.1:4222, or a comma-separated list of them")]
    Empty,
    #[error("entry {position} of the NATS server list `{list}` is empty (a doubled or trailing comma?)")]
    EmptyEntry { list: String, position: usize },
    #[error("NATS server `{entry}` (entry {position} of the list) is invalid: {reason}")]
    Invalid {
        /// The entry as given, with any password or token hidden.
        entry: String,
        /// 1-based.
        position: usize,
        reason: InvalidServer,
    },
    #[error(
        "the NATS server list mixes WebSocket URLs (`{websocket}`) with other ones (`{other}`); \
         the client connects over one kind only"
    )]
    MixedTransports { websocket: String, other: String },
}

/// What is wrong with one entry of a server list.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidServer {
    #[error("unknown scheme `{0}` (use nats://, tls://, ws:// or wss://)")]
    Scheme(String),
    #[error("it contains whitespace (separate servers with commas)")]
    Whitespace,
    #[error("it names no host")]
    NoHost,
    #[error("port `{0}` is not a number from 0 to 65535")]
    Port(String),
    #[error("a NATS server URL has no path, query or fragment (`{0}`)")]
    Path(String),
    #[error("{0}")]
    Url(String),
}

impl ServerList {
    /// The servers, in the order given.
    pub fn addrs(&self) -> &[ServerAddr] {
        &self.0
    }

    /// How many servers are listed (at least one).
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Always false: a list has at least one server.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl FromStr for ServerList {
    type Err = ServerListError;

    fn from_str(list: &str) -> Result<Self, Self::Err> {
        if list.trim().is_empty() {
            return Err(ServerListError::Empty);
        }
        let mut addrs = Vec::new();
        for (i, raw) in list.split(',').enumerate() {
            let entry = raw.trim();
            if entry.is_empty() {
                return Err(ServerListError::EmptyEntry {
                    list: redact_list(list),
                    position: i + 1,
                });
            }
            let addr = parse_entry(entry).map_err(|reason| ServerListError::Invalid {
                entry: redact(entry),
                position: i + 1,
                reason,
            })?;
            addrs.push(addr);
        }
        let websocket = addrs.iter().find(|a| a.is_websocket());
        let other = addrs.iter().find(|a| !a.is_websocket());
        if let (Some(w), Some(o)) = (websocket, other) {
            return Err(ServerListError::MixedTransports {
                websocket: redact(w.as_url_str()),
                other: redact(o.as_url_str()),
            });
        }
        Ok(Self(addrs))
    }
}

/// The list as it can be shown: comma-separated, passwords hidden.
impl fmt::Display for ServerList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, a) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            f.write_str(&redact(a.as_url_str()))?;
        }
        Ok(())
    }
}

impl async_nats::ToServerAddrs for ServerList {
    type Iter = std::vec::IntoIter<ServerAddr>;

    fn to_server_addrs(&self) -> std::io::Result<Self::Iter> {
        Ok(self.0.clone().into_iter())
    }
}

/// One trimmed, non-empty entry.
fn parse_entry(entry: &str) -> Result<ServerAddr, InvalidServer> {
    if entry.chars().any(char::is_whitespace) {
        return Err(InvalidServer::Whitespace);
    }
    let rest = match entry.split_once("://") {
        Some((scheme, rest)) => {
            if !["nats", "tls", "ws", "wss"]
                .iter()
                .any(|s| s.eq_ignore_ascii_case(scheme))
            {
                return Err(InvalidServer::Scheme(scheme.to_owned()));
            }
            rest
        }
        None => entry,
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    if !tail.is_empty() && tail != "/" {
        return Err(InvalidServer::Path(tail.to_owned()));
    }
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let (host, port) = match host_port.strip_prefix('[') {
        // [IPv6]:port
        Some(v6) => match v6.split_once(']') {
            Some((host, after)) => match after.strip_prefix(':') {
                Some(port) => (host, Some(port)),
                None if after.is_empty() => (host, None),
                None => {
                    return Err(InvalidServer::Url(format!(
                        "unexpected `{after}` after the IPv6 address"
                    )))
                }
            },
            None => return Err(InvalidServer::Url("an IPv6 address without its closing `]`".into())),
        },
        None => match host_port.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (host_port, None),
        },
    };
    if host.is_empty() {
        return Err(InvalidServer::NoHost);
    }
    if let Some(port) = port {
        if port.parse::<u16>().is_err() {
            return Err(InvalidServer::Port(port.to_owned()));
        }
    }
    // What is left to find wrong (a bad character in the host, say) the
    // client's own parser finds; its message is only shown.
    entry
        .parse::<ServerAddr>()
        .map_err(|e| InvalidServer::Url(e.to_string()))
}

/// `entry` with the password (or a token standing alone) of its user
/// information replaced by `***`.
fn redact(entry: &str) -> String {
    let (scheme, rest) = match entry.split_once("://") {
        Some((s, r)) => (Some(s), r),
        None => (None, entry),
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let Some((user_info, host)) = authority.rsplit_once('@') else {
        return entry.to_owned();
    };
    let hidden = match user_info.split_once(':') {
        Some((user, _password)) => format!("{user}:***"),
        None => "***".to_owned(),
    };
    match scheme {
        Some(s) => format!("{s}://{hidden}@{host}{tail}"),
        None => format!("{hidden}@{host}{tail}"),
    }
}

fn redact_list(list: &str) -> String {
    list.split(',').map(|e| redact(e.trim())).collect::<Vec<_>>().join(",")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn hosts(list: &str) -> Vec<(String, String, u16)> {
        list.parse::<ServerList>()
            .unwrap()
            .addrs()
            .iter()
            .map(|a| (a.scheme().to_owned(), a.host().to_owned(), a.port()))
            .collect()
    }

    fn err(list: &str) -> ServerListError {
        list.parse::<ServerList>().unwrap_err()
    }

    #[test]
    fn one_url_or_a_list_with_or_without_schemes_and_spaces() {
        assert_eq!(
            hosts("nats://127.0.0.1:4222"),
            [("nats".into(), "127.0.0.1".into(), 4222)]
        );
        assert_eq!(
            hosts("nats://127.0.0.1:4222,nats://127.0.0.1:4223"),
            [
                ("nats".into(), "127.0.0.1".into(), 4222),
                ("nats".into(), "127.0.0.1".into(), 4223)
            ]
        );
        assert_eq!(
            hosts(" n1.example:4222 , nats://n2.example ,tls://n3.example:7422 "),
            [
                ("nats".into(), "n1.example".into(), 4222),
                ("nats".into(), "n2.example".into(), 4222),
                ("tls".into(), "n3.example".into(), 7422)
            ]
        );
        assert_eq!(hosts("[::1]:4223"), [("nats".into(), "::1".into(), 4223)]);
        assert_eq!(
            hosts("NATS://localhost:4222/"),
            [("nats".into(), "localhost".into(), 4222)]
        );
        assert_eq!(hosts("ws://a:80,wss://b:443").len(), 2);
        let l: ServerList = "nats://u:secret@a:4222,b".parse().unwrap();
        assert_eq!(l.len(), 2);
        assert_eq!(l.addrs()[0].password(), Some("secret"));
        assert_eq!(l.to_string(), "nats://u:***@a:4222,nats://b");
    }

    #[test]
    fn an_empty_list_or_entry_is_refused_with_its_position() {
        assert_eq!(err(""), ServerListError::Empty);
        assert_eq!(err("  "), ServerListError::Empty);
        assert_eq!(
            err("nats://a:4222,,nats://b:4222"),
            ServerListError::EmptyEntry {
                list: "nats://a:4222,,nats://b:4222".into(),
                position: 2
            }
        );
        assert!(matches!(
            err("a:4222, "),
            ServerListError::EmptyEntry { position: 2, .. }
        ));
        assert!(matches!(
            err(",a:4222"),
            ServerListError::EmptyEntry { position: 1, .. }
        ));
    }

    #[test]
    fn a_bad_entry_is_named_with_why() {
        let e = err("nats://127.0.0.1:4222,nats://127.0.0.1:42x3");
        assert_eq!(
            e,
            ServerListError::Invalid {
                entry: "nats://127.0.0.1:42x3".into(),
                position: 2,
                reason: InvalidServer::Port("42x3".into())
            }
        );
        let text = e.to_string();
        assert!(text.contains("`nats://127.0.0.1:42x3`") && text.contains("entry 2") && text.contains("42x3"));

        let reason = |list: &str| match err(list) {
            ServerListError::Invalid { reason, .. } => reason,
            other => panic!("{list}: {other:?}"),
        };
        assert_eq!(reason("http://a:4222"), InvalidServer::Scheme("http".into()));
        assert_eq!(reason("a:99999"), InvalidServer::Port("99999".into()));
        assert_eq!(reason("a:"), InvalidServer::Port(String::new()));
        assert_eq!(reason("nats://:4222"), InvalidServer::NoHost);
        assert_eq!(reason("nats://"), InvalidServer::NoHost);
        assert_eq!(reason("nats://a:4222 nats://b:4222"), InvalidServer::Whitespace);
        assert_eq!(reason("nats://a:4222/stream"), InvalidServer::Path("/stream".into()));
        assert_eq!(reason("nats://a:4222;b"), InvalidServer::Port("4222;b".into()));
        assert!(matches!(reason("nats://a_b^c:4222"), InvalidServer::Url(_)));
        assert!(matches!(reason("[::1:4222"), InvalidServer::Url(_)));
    }

    #[test]
    fn secrets_never_reach_an_error() {
        let e = err("nats://alice:s3cret@a:4222,nats://tok3n@b:x").to_string();
        assert!(!e.contains("tok3n") && e.contains("nats://***@b:x"), "{e}");
        let e = err("nats://alice:s3cret@a:4222,,b").to_string();
        assert!(!e.contains("s3cret") && e.contains("alice:***@a:4222"), "{e}");
        let e = err("ws://alice:s3cret@a:80,nats://b").to_string();
        assert!(!e.contains("s3cret"), "{e}");
        assert!(e.contains("mixes WebSocket"), "{e}");
    }
}
