//! Images given as `http(s)://` URLs (off unless `--allow-image-urls`),
//! fetched so that a request cannot make the server reach what the caller
//! could not: no private, loopback, link-local, multicast, reserved or cloud
//! metadata address, unless `--image-url-allow-hosts` lists it.
//!
//! - Every address is checked where it is used: names are resolved by
//!   [`Guard`], which hands the client only the addresses that pass (so the
//!   connection goes to an address that was checked: no DNS rebinding between
//!   check and use); IP literals are checked before the request and in each
//!   redirect.
//! - At most `max_redirects` redirects, each re-checked (scheme, address).
//! - A connect timeout and a total timeout; the body is read in chunks and
//!   refused once it passes `max_bytes` (or at once from `Content-Length`).
//! - No proxy (a proxy would connect on our behalf, past these checks).
//!
//! Every refusal is a 4xx with its own `code`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;

use super::error::ApiError;

/// A host `--image-url-allow-hosts` lets through although its addresses are
/// not public.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostRule {
    /// A host name, matched case-insensitively, exactly.
    Name(String),
    /// An address or a network (`10.1.2.3`, `10.0.0.0/8`, `fd00::/8`).
    Net(IpAddr, u8),
}

impl std::str::FromStr for HostRule {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.is_empty() {
            return Err("an empty host".into());
        }
        let (addr, bits) = match s.split_once('/') {
            Some((a, b)) => (a, Some(b)),
            None => (s, None),
        };
        // `[fd00::1]`, `[fd00::]/8`: brackets around an IPv6 address.
        let addr = addr.trim_start_matches('[').trim_end_matches(']');
        let s = if bits.is_none() { addr } else { s };
        match addr.parse::<IpAddr>() {
            Ok(ip) => {
                let max = if ip.is_ipv4() { 32 } else { 128 };
                let bits = match bits {
                    Some(b) => b
                        .parse::<u8>()
                        .ok()
                        .filter(|&b| b <= max)
                        .ok_or_else(|| format!("`{s}`: a prefix length of 0 to {max}"))?,
                    None => max,
                };
                Ok(HostRule::Net(ip, bits))
            }
            Err(_) if bits.is_none() => {
                let ok = s
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
                if ok {
                    Ok(HostRule::Name(s.to_ascii_lowercase()))
                } else {
                    Err(format!("`{s}` is not a host name, an address or a network"))
                }
            }
            Err(_) => Err(format!("`{s}` is not an address/prefix")),
        }
    }
}

fn in_net(ip: IpAddr, net: IpAddr, bits: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = if bits == 0 {
                0
            } else {
                u32::MAX << (32 - bits)
            };
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = if bits == 0 {
                0
            } else {
                u128::MAX << (128 - bits)
            };
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

/// Whether `ip` is an ordinary public unicast address: not private,
/// loopback, link-local (cloud metadata lives there), multicast,
/// unspecified, broadcast, shared (CGNAT), documentation, benchmarking or
/// reserved — for IPv6 also unique-local, site-local, and IPv4 in disguise
/// (mapped, compatible, NAT64, 6to4) judged as its IPv4 address.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => is_public_v6(v6),
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let blocked: [(Ipv4Addr, u8); 15] = [
        (Ipv4Addr::new(0, 0, 0, 0), 8),       // "this network"
        (Ipv4Addr::new(10, 0, 0, 0), 8),      // private
        (Ipv4Addr::new(100, 64, 0, 0), 10),   // shared address space (CGNAT)
        (Ipv4Addr::new(127, 0, 0, 0), 8),     // loopback
        (Ipv4Addr::new(169, 254, 0, 0), 16),  // link-local, cloud metadata
        (Ipv4Addr::new(172, 16, 0, 0), 12),   // private
        (Ipv4Addr::new(192, 0, 0, 0), 24),    // IETF protocol assignments
        (Ipv4Addr::new(192, 0, 2, 0), 24),    // documentation
        (Ipv4Addr::new(192, 88, 99, 0), 24),  // 6to4 relay anycast
        (Ipv4Addr::new(192, 168, 0, 0), 16),  // private
        (Ipv4Addr::new(198, 18, 0, 0), 15),   // benchmarking
        (Ipv4Addr::new(198, 51, 100, 0), 24), // documentation
        (Ipv4Addr::new(203, 0, 113, 0), 24),  // documentation
        (Ipv4Addr::new(224, 0, 0, 0), 4),     // multicast
        (Ipv4Addr::new(240, 0, 0, 0), 4),     // reserved, broadcast
    ];
    !blocked
        .iter()
        .any(|&(net, bits)| in_net(IpAddr::V4(ip), IpAddr::V4(net), bits))
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    let seg = ip.segments();
    // IPv4 inside IPv6: judged as the IPv4 address.
    if let Some(v4) = ip.to_ipv4_mapped() {
        return is_public_v4(v4);
    }
    let embedded_v4 = |hi: u16, lo: u16| Ipv4Addr::from(((hi as u32) << 16) | lo as u32);
    if seg[..6] == [0, 0, 0, 0, 0, 0] {
        // ::/96 (IPv4-compatible, ::, ::1)
        return seg[6] != 0 && is_public_v4(embedded_v4(seg[6], seg[7]));
    }
    if seg[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return is_public_v4(embedded_v4(seg[6], seg[7])); // NAT64
    }
    if seg[0] == 0x2002 {
        return is_public_v4(embedded_v4(seg[1], seg[2])); // 6to4
    }
    let blocked: [(Ipv6Addr, u8); 8] = [
        (Ipv6Addr::new(0x64, 0xff9b, 1, 0, 0, 0, 0, 0), 48), // local NAT64
        (Ipv6Addr::new(0x100, 0, 0, 0, 0, 0, 0, 0), 64),     // discard
        (Ipv6Addr::new(0x2001, 0, 0, 0, 0, 0, 0, 0), 23),    // IETF assignments (Teredo...)
        (Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0), 32), // documentation
        (Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0, 0), 7),     // unique local (incl. fd00:ec2::254)
        (Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0), 10),    // link-local
        (Ipv6Addr::new(0xfec0, 0, 0, 0, 0, 0, 0, 0), 10),    // site-local
        (Ipv6Addr::new(0xff00, 0, 0, 0, 0, 0, 0, 0), 8),     // multicast
    ];
    !blocked
        .iter()
        .any(|&(net, bits)| in_net(IpAddr::V6(ip), IpAddr::V6(net), bits))
}

/// What may be fetched, and how much.
#[derive(Debug, Clone)]
pub struct UrlPolicy {
    /// `--allow-image-urls`.
    pub enabled: bool,
    /// `--image-url-allow-hosts`.
    pub allow_hosts: Vec<HostRule>,
    /// Connecting, and the whole fetch.
    pub connect_timeout: Duration,
    pub timeout: Duration,
    /// Largest body.
    pub max_bytes: usize,
    pub max_redirects: usize,
}

impl Default for UrlPolicy {
    fn default() -> Self {
        Self {
            enabled: false,
            allow_hosts: Vec::new(),
            connect_timeout: Duration::from_secs(5),
            timeout: Duration::from_secs(15),
            max_bytes: 32 << 20,
            max_redirects: 3,
        }
    }
}

impl UrlPolicy {
    fn host_listed(&self, host: &str) -> bool {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let ip = host.parse::<IpAddr>().ok();
        self.allow_hosts.iter().any(|r| match (r, ip) {
            (HostRule::Name(n), _) => n.eq_ignore_ascii_case(host),
            (HostRule::Net(net, bits), Some(ip)) => in_net(ip, *net, *bits),
            _ => false,
        })
    }

    /// May a connection go to `ip` for host `host`?
    pub fn allows(&self, host: &str, ip: IpAddr) -> bool {
        is_public(ip) || self.host_listed(host) || self.host_listed(&ip.to_string())
    }

    /// Checks a URL's scheme, and its host when it is an address.
    fn check_url(&self, url: &reqwest::Url) -> Result<(), Refusal> {
        if url.scheme() != "http" && url.scheme() != "https" {
            return Err(Refusal::Scheme(url.scheme().to_string()));
        }
        let Some(host) = url.host_str() else {
            return Err(Refusal::Scheme("a URL without a host".into()));
        };
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        match bare.parse::<IpAddr>() {
            Ok(ip) => self.check_ip(bare, ip),
            Err(_) => Ok(()), // a name: checked when resolved (Guard)
        }
    }

    fn check_ip(&self, host: &str, ip: IpAddr) -> Result<(), Refusal> {
        if self.allows(host, ip) {
            Ok(())
        } else {
            Err(Refusal::Address(host.to_string(), ip))
        }
    }
}

/// Why a URL was refused before any byte was fetched.
#[derive(Debug, thiserror::Error)]
enum Refusal {
    #[error("only http and https URLs are fetched, not {0}")]
    Scheme(String),
    #[error("{0} is {1}, not a public address")]
    Address(String, IpAddr),
    #[error("{0} resolves to no public address ({1})")]
    Resolved(String, String),
    #[error("more than {0} redirects")]
    Redirects(usize),
}

/// Resolves names for the client, keeping only the addresses the policy
/// allows: the client can only connect where the check passed.
struct Guard(Arc<UrlPolicy>);

impl reqwest::dns::Resolve for Guard {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.0.clone();
        let host = name.as_str().to_string();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let (ok, refused): (Vec<SocketAddr>, Vec<SocketAddr>) = addrs
                .into_iter()
                .partition(|a| policy.allows(&host, a.ip()));
            if ok.is_empty() {
                let shown: Vec<String> = refused.iter().map(|a| a.ip().to_string()).collect();
                return Err(Box::new(Refusal::Resolved(host, shown.join(", ")))
                    as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(ok.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// The URL fetcher of one server.
#[derive(Clone)]
pub struct Fetcher {
    client: reqwest::Client,
    policy: Arc<UrlPolicy>,
}

fn refusal_of<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a Refusal> {
    let mut cur: Option<&'a (dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(r) = err.downcast_ref::<Refusal>() {
            return Some(r);
        }
        cur = err.source();
    }
    None
}

impl Fetcher {
    pub fn new(policy: UrlPolicy) -> Self {
        let policy = Arc::new(policy);
        let p = policy.clone();
        let redirects = reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() > p.max_redirects {
                return attempt.error(Refusal::Redirects(p.max_redirects));
            }
            match p.check_url(attempt.url()) {
                Ok(()) => attempt.follow(),
                Err(r) => attempt.error(r),
            }
        });
        let client = reqwest::Client::builder()
            .no_proxy()
            .redirect(redirects)
            .dns_resolver(Arc::new(Guard(policy.clone())))
            .connect_timeout(policy.connect_timeout)
            .timeout(policy.timeout)
            .user_agent(concat!("capivara/", env!("CARGO_PKG_VERSION")))
            .build()
            .expect("an HTTP client with rustls");
        Self { client, policy }
    }

    pub fn policy(&self) -> &UrlPolicy {
        &self.policy
    }

    fn refused(&self, field: &str, r: &Refusal) -> ApiError {
        let (status, code) = match r {
            Refusal::Scheme(_) => (StatusCode::BAD_REQUEST, "invalid_url"),
            Refusal::Redirects(_) => (StatusCode::BAD_REQUEST, "too_many_redirects"),
            _ => (StatusCode::FORBIDDEN, "url_not_allowed"),
        };
        let hint = if code == "url_not_allowed" {
            " (--image-url-allow-hosts can list it)"
        } else {
            ""
        };
        ApiError::new(status, code, format!("`{field}`: {r}{hint}"))
    }

    /// The bytes at `url`, within the policy.
    pub async fn fetch(&self, field: &str, url: &str) -> Result<Vec<u8>, ApiError> {
        if !self.policy.enabled {
            return Err(ApiError::bad_request(
                "image_urls_disabled",
                format!("`{field}` is a URL: this server fetches none (start it with --allow-image-urls)"),
            ));
        }
        let parsed = reqwest::Url::parse(url).map_err(|e| {
            ApiError::bad_request("invalid_url", format!("`{field}`: not a URL ({e})"))
        })?;
        self.policy
            .check_url(&parsed)
            .map_err(|r| self.refused(field, &r))?;
        let failed = |e: reqwest::Error| -> ApiError {
            if let Some(r) = refusal_of(&e) {
                return self.refused(field, r);
            }
            if e.is_timeout() {
                return ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "url_timeout",
                    format!(
                        "`{field}`: the image server did not answer within {:?}",
                        self.policy.timeout
                    ),
                );
            }
            let mut msg = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg = format!("{msg}: {s}");
                src = s.source();
            }
            ApiError::bad_request("url_fetch_failed", format!("`{field}`: {msg}"))
        };
        let mut resp = self.client.get(parsed).send().await.map_err(failed)?;
        if resp.status().is_redirection() {
            // The client follows http(s) redirects itself (each checked by
            // the policy); one it hands back points elsewhere.
            let to = resp
                .headers()
                .get(reqwest::header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|l| resp.url().join(l).ok());
            if let Some(to) = to {
                self.policy
                    .check_url(&to)
                    .map_err(|r| self.refused(field, &r))?;
            }
        }
        if !resp.status().is_success() {
            return Err(ApiError::bad_request(
                "url_fetch_failed",
                format!("`{field}`: the image server answered {}", resp.status()),
            ));
        }
        let max = self.policy.max_bytes;
        let too_large = || {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "url_too_large",
                format!("`{field}`: the image is larger than {max} bytes"),
            )
        };
        if resp.content_length().is_some_and(|n| n > max as u64) {
            return Err(too_large());
        }
        if let Some(ct) = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
        {
            let ct = ct.to_ascii_lowercase();
            if !(ct.starts_with("image/") || ct.starts_with("application/octet-stream")) {
                return Err(ApiError::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "url_not_image",
                    format!("`{field}`: the URL holds `{ct}`, not an image"),
                ));
            }
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(failed)? {
            if body.len() + chunk.len() > max {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn only_public_unicast_addresses_pass() {
        for private in [
            "10.0.0.1",
            "10.255.255.255",
            "172.16.0.1",
            "172.31.255.254",
            "192.168.1.1",
            "127.0.0.1",
            "127.0.0.2",
            "169.254.169.254", // cloud metadata
            "169.254.0.1",
            "100.64.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "239.255.255.250",
            "255.255.255.255",
            "240.0.0.1",
            "192.0.2.5",
            "198.18.0.1",
            "::",
            "::1",
            "fe80::1",
            "fc00::1",
            "fd00:ec2::254", // AWS metadata over IPv6
            "ff02::1",
            "fec0::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "::ffff:169.254.169.254",
            "::127.0.0.1",
            "64:ff9b::a00:1", // NAT64 of 10.0.0.1
            "2002:a00:1::1",  // 6to4 of 10.0.0.1
            "2001:db8::1",
        ] {
            assert!(!is_public(ip(private)), "{private} passed");
        }
        for public in [
            "8.8.8.8",
            "1.1.1.1",
            "172.15.255.255",
            "172.32.0.1",
            "192.167.1.1",
            "100.63.255.255",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "2002:808:808::1",
        ] {
            assert!(is_public(ip(public)), "{public} refused");
        }
    }

    #[test]
    fn the_allow_list_takes_names_addresses_and_networks() {
        let rules: Vec<HostRule> = ["127.0.0.1", "fotos.internal", "10.0.0.0/8", "[fd00::]/8"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let p = UrlPolicy {
            enabled: true,
            allow_hosts: rules,
            ..UrlPolicy::default()
        };
        assert!(p.allows("127.0.0.1", ip("127.0.0.1")));
        assert!(!p.allows("127.0.0.2", ip("127.0.0.2")));
        assert!(p.allows("FOTOS.internal", ip("192.168.0.9")));
        assert!(!p.allows("other.internal", ip("192.168.0.9")));
        assert!(p.allows("x", ip("10.9.8.7")));
        assert!(p.allows("x", ip("fd12::1")));
        assert!(!p.allows("localhost", ip("::1")));
        for bad in ["", "10.0.0.0/33", "a b", "10.0.0.0/x", "host/8"] {
            assert!(bad.parse::<HostRule>().is_err(), "{bad}");
        }
    }
}
