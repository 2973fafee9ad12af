//! Where a service is: `unix:PATH` or `https://HOST[:PORT]`, parsed and printed back.

use std::path::PathBuf;

use crate::error::{Error, Result};

/// Where a service is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Remote {
    /// Its Unix socket.
    Unix(PathBuf),
    /// Its TCP listener, over TLS (`keyhold serve --listen tcp:… --tls-cert …`): the client
    /// needs [`RemoteKeystore::with_tls`](crate::service::RemoteKeystore::with_tls).
    Https {
        /// A DNS name or an IP address (an IPv6 one without brackets): the service's certificate
        /// must name it.
        host: String,
        /// The TCP port.
        port: u16,
    },
}

/// The port of `https://HOST` without one, as for any https URL.
pub const DEFAULT_HTTPS_PORT: u16 = 443;

impl Remote {
    /// Parses `unix:PATH` or `https://HOST[:PORT]` (HOST a DNS name, an IPv4 address or an
    /// IPv6 one in brackets, `https://[::1]:8443`; PORT 443 if not given). `http://` is
    /// refused: the service speaks TCP with TLS only.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for anything else, and for an https remote with a path, a query,
    /// a fragment or a user.
    pub fn parse(text: &str) -> Result<Self> {
        let scheme = |prefix: &str| {
            text.get(..prefix.len())
                .filter(|s| s.eq_ignore_ascii_case(prefix))
                .map(|_| &text[prefix.len()..])
        };
        if let Some(rest) = scheme("https://") {
            return Self::parse_https(text, rest);
        }
        if scheme("http://").is_some() {
            return Err(Error::InvalidInput(format!(
                "remote `{text}`: plaintext HTTP over TCP is not offered (keyhold serve speaks \
                 TCP with TLS only, and a token or key would cross the network in the clear): \
                 give https://HOST:PORT, or unix:PATH for the service's local socket"
            )));
        }
        match text.split_once(':') {
            Some(("unix", path)) if !path.is_empty() => Ok(Self::Unix(PathBuf::from(path))),
            _ => Err(Error::InvalidInput(format!(
                "remote `{text}`: give unix:PATH, the socket of `keyhold serve`, or \
                 https://HOST:PORT, its TLS listener"
            ))),
        }
    }

    /// `HOST[:PORT]` of `https://HOST[:PORT]` (`rest`), `text` being the whole remote.
    fn parse_https(text: &str, rest: &str) -> Result<Self> {
        let bad = |why: String| {
            Error::InvalidInput(format!(
                "remote `{text}`: {why}: give https://HOST:PORT (HOST a DNS name or an IP \
                 address, an IPv6 one in brackets: https://[::1]:8443)"
            ))
        };
        // A lone trailing slash is the root path, as an address bar writes it: nothing else.
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.contains(['/', '?', '#']) {
            return Err(bad(
                "no path, query or fragment: the service's paths are its own (/v1/…)".into(),
            ));
        }
        if authority.contains('@') {
            return Err(bad(
                "no user or password: a bearer token or a client certificate says who the client \
                 is"
                .into(),
            ));
        }
        let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
            let (address, after) = bracketed
                .split_once(']')
                .ok_or_else(|| bad("an IPv6 address's `[` is not closed".into()))?;
            let address: std::net::Ipv6Addr = address
                .parse()
                .map_err(|_| bad(format!("`{address}` is not an IPv6 address")))?;
            let port = match after {
                "" => None,
                _ => Some(
                    after
                        .strip_prefix(':')
                        .ok_or_else(|| bad(format!("`{after}` after the address")))?,
                ),
            };
            (address.to_string(), port)
        } else {
            let (host, port) = match authority.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            };
            if host.contains(':') {
                return Err(bad("an IPv6 address goes in brackets".into()));
            }
            if host.is_empty() {
                return Err(bad("no host".into()));
            }
            // A DNS name or an IPv4 address, as a certificate can name it.
            if rustls::pki_types::ServerName::try_from(host.to_owned()).is_err() {
                return Err(bad(format!("`{host}` is not a host name or an IP address")));
            }
            (host.to_owned(), port)
        };
        let port = match port {
            None => DEFAULT_HTTPS_PORT,
            Some(port) => port
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| bad(format!("`{port}` is not a port (1 to 65535)")))?,
        };
        Ok(Self::Https { host, port })
    }
}

impl std::fmt::Display for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
            // Always with its port, in brackets if IPv6: what `parse` reads back as the same.
            Self::Https { host, port } if host.contains(':') => {
                write!(f, "https://[{host}]:{port}")
            }
            Self::Https { host, port } => write!(f, "https://{host}:{port}"),
        }
    }
}
