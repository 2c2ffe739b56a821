//! Matching a request to a route: the first route in config order whose listener, host, path and headers all
//! match wins. It knows nothing of upstreams or sockets: it sees a request through [`RequestView`], which both
//! request paths (the upgrade fast path's parsed head and hyper's plain HTTP request) implement.

use crate::config::{HostMatch, PathMatch, Route};
use crate::http::RequestView;

/// The host name of a `Host` value: without its port, lowercase ASCII compared by the caller.
fn host_name(host: &[u8]) -> &[u8] {
    let host = host.trim_ascii();
    if host.first() == Some(&b'[') {
        // [v6]:port
        return host.iter().position(|&b| b == b']').map_or(host, |end| &host[..=end]);
    }
    let name = match host.iter().rposition(|&b| b == b':') {
        Some(colon) => &host[..colon],
        None => host,
    };
    // `example.com.` is `example.com` (a fully qualified name): a route for one holds for the other.
    name.strip_suffix(b".").unwrap_or(name)
}

impl HostMatch {
    fn matches(&self, host: Option<&[u8]>) -> bool {
        let name = || host.map(host_name).unwrap_or_default();
        match self {
            HostMatch::Any => true,
            HostMatch::Exact(want) => name().eq_ignore_ascii_case(want.as_bytes()),
            HostMatch::Suffix(suffix) => {
                let name = name();
                name.len() > suffix.len() && name[name.len() - suffix.len()..].eq_ignore_ascii_case(suffix.as_bytes())
            }
        }
    }
}

impl PathMatch {
    fn matches(&self, path: &[u8]) -> bool {
        match self {
            PathMatch::Any => true,
            PathMatch::Prefix(prefix) => path.starts_with(prefix.as_bytes()),
            PathMatch::Exact(exact) => path == exact.as_bytes(),
            PathMatch::Regex(re) => std::str::from_utf8(path).is_ok_and(|p| re.is_match(p)),
        }
    }
}

/// The first route that matches a request accepted on `listener`.
pub fn find<'r>(routes: &'r [Route], listener: &str, request: &impl RequestView) -> Option<&'r Route> {
    routes.iter().find(|route| {
        route.listener.as_deref().is_none_or(|l| l == listener)
            && route.host.matches(request.host())
            && route.path.matches(request.path())
            && route
                .headers
                .iter()
                .all(|(name, value)| request.header_values(name).any(|v| v == value.as_bytes()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Deflate, Relay};

    struct Req {
        host: Option<&'static str>,
        target: &'static str,
        headers: Vec<(&'static str, &'static str)>,
    }

    impl RequestView for Req {
        fn host(&self) -> Option<&[u8]> {
            self.host.map(str::as_bytes)
        }
        fn target(&self) -> &[u8] {
            self.target.as_bytes()
        }
        fn header_values(&self, name: &str) -> impl Iterator<Item = &[u8]> {
            self.headers
                .iter()
                .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_bytes())
        }
    }

    fn req(host: &'static str, target: &'static str) -> Req {
        Req {
            host: Some(host),
            target,
            headers: Vec::new(),
        }
    }

    fn route(name: &str, host: HostMatch, path: PathMatch, headers: &[(&str, &str)]) -> Route {
        Route {
            name: name.into(),
            listener: None,
            host,
            path,
            headers: headers.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect(),
            upstream: Some(0),
            relay: Relay::tunnel(),
            idle_timeout: None,
            deflate: Deflate::Pass,
            access: Default::default(),
            origins: None,
            auth: None,
        }
    }

    #[test]
    fn a_fully_qualified_host_matches_as_the_name_without_its_dot() {
        assert_eq!(host_name(b"admin.example.com."), b"admin.example.com");
        assert_eq!(host_name(b"admin.example.com.:8080"), b"admin.example.com");
        assert_eq!(host_name(b"[::1]:80"), b"[::1]");
    }

    #[test]
    fn first_match_wins_by_host_path_and_header() {
        let routes = vec![
            route("tenant-a", HostMatch::Any, PathMatch::Any, &[("x-tenant", "a")]),
            route(
                "exact",
                HostMatch::Exact("chat.example.com".into()),
                PathMatch::Exact("/ws".into()),
                &[],
            ),
            route(
                "wild",
                HostMatch::Suffix(".example.com".into()),
                PathMatch::Prefix("/ws".into()),
                &[],
            ),
            route(
                "rooms",
                HostMatch::Any,
                PathMatch::Regex(regex::Regex::new("^/rooms/[0-9]+$").unwrap()),
                &[],
            ),
        ];
        let name = |r: &Req| find(&routes, "l", r).map(|r| r.name.clone());
        assert_eq!(name(&req("Chat.Example.com:8080", "/ws?x=1")).as_deref(), Some("exact"));
        assert_eq!(name(&req("chat.example.com", "/ws/more")).as_deref(), Some("wild"));
        assert_eq!(name(&req("a.b.example.com", "/wsx")).as_deref(), Some("wild"));
        assert_eq!(
            name(&req("example.com", "/ws")),
            None,
            "*.example.com does not match example.com"
        );
        assert_eq!(name(&req("x.org", "/rooms/42")).as_deref(), Some("rooms"));
        assert_eq!(name(&req("x.org", "/rooms/42a")), None);
        let mut tenant = req("chat.example.com", "/ws");
        tenant.headers.push(("X-Tenant", "a"));
        assert_eq!(name(&tenant).as_deref(), Some("tenant-a"), "the first route wins");
        tenant.headers[0].1 = "A";
        assert_eq!(name(&tenant).as_deref(), Some("exact"), "header values compare exactly");
    }

    #[test]
    fn listener_restricts_a_route() {
        let mut internal = route("internal", HostMatch::Any, PathMatch::Any, &[]);
        internal.listener = Some("admin".into());
        let routes = vec![internal, route("public", HostMatch::Any, PathMatch::Any, &[])];
        assert_eq!(find(&routes, "admin", &req("h", "/")).unwrap().name, "internal");
        assert_eq!(find(&routes, "public", &req("h", "/")).unwrap().name, "public");
    }

    #[test]
    fn cookies_queries_and_ipv6_hosts() {
        let mut r = req("[::1]:8080", "/p?a=1&user=bob&z");
        r.headers.push(("Cookie", "x=1; SERVERID=abc ; y=2"));
        assert_eq!(r.cookie("SERVERID"), Some(&b"abc"[..]));
        assert_eq!(r.cookie("SERVER"), None);
        assert_eq!(r.query("user"), Some(&b"bob"[..]));
        assert_eq!(r.query("z"), Some(&b""[..]));
        assert_eq!(r.query("b"), None);
        assert_eq!(r.path(), b"/p");
        assert!(HostMatch::Exact("[::1]".into()).matches(r.host()));
    }
}
