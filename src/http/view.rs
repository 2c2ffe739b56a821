//! A request as routing and the choice of a server see it: the few things they may ask of it, which both request
//! paths (the upgrade fast path's parsed head and hyper's plain HTTP request) answer from what they parsed.

/// What routing (and the choice of a server) may ask of a request.
pub trait RequestView {
    /// The `Host` header (or the request target's authority), as sent.
    fn host(&self) -> Option<&[u8]>;
    /// The request target (origin form: path and query), as sent.
    fn target(&self) -> &[u8];
    /// Values of a header, in order; `name` is lowercase.
    fn header_values(&self, name: &str) -> impl Iterator<Item = &[u8]>;

    /// The path: the request target without its query.
    fn path(&self) -> &[u8] {
        let target = self.target();
        let end = target.iter().position(|&b| b == b'?').unwrap_or(target.len());
        &target[..end]
    }

    /// The first value of a header.
    fn header(&self, name: &str) -> Option<&[u8]> {
        self.header_values(name).next()
    }

    /// A cookie's value, from the `Cookie` headers.
    fn cookie(&self, name: &str) -> Option<&[u8]> {
        self.header_values("cookie")
            .flat_map(|v| v.split(|&b| b == b';'))
            .find_map(|pair| {
                let pair = pair.trim_ascii();
                let eq = pair.iter().position(|&b| b == b'=')?;
                (&pair[..eq] == name.as_bytes()).then(|| pair[eq + 1..].trim_ascii())
            })
    }

    /// A query-string parameter's value, as sent (not decoded).
    fn query(&self, name: &str) -> Option<&[u8]> {
        let target = self.target();
        let start = target.iter().position(|&b| b == b'?')? + 1;
        target[start..].split(|&b| b == b'&').find_map(|pair| {
            let eq = pair.iter().position(|&b| b == b'=').unwrap_or(pair.len());
            (&pair[..eq] == name.as_bytes()).then(|| pair.get(eq + 1..).unwrap_or_default())
        })
    }
}
