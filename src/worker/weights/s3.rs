//! The S3 calls of the fetcher: ListObjectsV2 and GET (ranged), signed with SigV4, over the
//! wire's HTTP client (TLS through rustls and the system's CA certificates). Refusals are
//! classified by the store's error code, with what to fix named for the common ones.

use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;

use super::sigv4::{self, Credentials, EMPTY_SHA256};
use super::FetchError;
use crate::worker::wire::http::{HttpClient, HttpError, Streaming};

/// Longest wait for a response's head (connect, TLS, request, status line and headers).
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(30);
/// The most bytes read of a listing page or an error body.
const MAX_XML_BYTES: usize = 16 << 20;
/// Keys per listing page asked for (S3's maximum).
const PAGE_KEYS: &str = "1000";

/// An object of a listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Object {
    pub key: String,
    pub size: u64,
    /// The ETag without its quotes, when given.
    pub etag: Option<String>,
}

/// Where the bucket is and how to reach it.
#[derive(Clone, Debug)]
pub struct Location {
    /// `http` or `https`.
    pub scheme: String,
    /// host[:port] of the endpoint.
    pub authority: String,
    pub region: String,
    pub bucket: String,
    /// `/bucket/key` on the endpoint (true), or `bucket.endpoint/key` (false).
    pub path_style: bool,
}

impl Location {
    /// From an endpoint URL (`http(s)://host[:port]`, nothing after the authority).
    pub fn new(
        endpoint: &str,
        region: &str,
        bucket: &str,
        path_style: bool,
    ) -> Result<Self, FetchError> {
        let bad = |why: &str| FetchError::Config(format!("endpoint {endpoint:?}: {why}"));
        let uri: hyper::Uri = endpoint
            .parse()
            .map_err(|e| bad(&format!("not a URL: {e}")))?;
        let scheme = match uri.scheme_str() {
            Some(s @ ("http" | "https")) => s.to_string(),
            _ => return Err(bad("needs http:// or https://")),
        };
        let authority = uri
            .authority()
            .ok_or_else(|| bad("has no host"))?
            .to_string();
        if authority.contains('@') {
            return Err(bad("must not carry credentials (use the Secret)"));
        }
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            return Err(bad("must be scheme://host[:port] only"));
        }
        if region.is_empty() {
            return Err(FetchError::Config("region is empty".into()));
        }
        Ok(Location {
            scheme,
            authority,
            region: region.to_string(),
            bucket: bucket.to_string(),
            path_style,
        })
    }

    /// `s3://bucket/key`, how errors name an object (or the bucket, `key` empty).
    pub fn url(&self, key: &str) -> String {
        format!("s3://{}/{key}", self.bucket)
    }

    fn host(&self) -> String {
        if self.path_style {
            self.authority.clone()
        } else {
            format!("{}.{}", self.bucket, self.authority)
        }
    }

    fn path(&self, key: &str) -> String {
        if self.path_style {
            sigv4::encode_path(&self.bucket, key)
        } else {
            sigv4::encode_path("", key)
        }
    }
}

/// An S3 client for one bucket.
#[derive(Clone, Debug)]
pub struct Store {
    pub loc: Location,
    http: HttpClient,
    creds: Option<Credentials>,
    /// The Secret the credentials come from, for the errors that say what to fix.
    pub secret: Option<String>,
    /// The clock, in Unix seconds (tests pin it).
    now: fn() -> i64,
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl Store {
    pub fn new(
        loc: Location,
        http: HttpClient,
        creds: Option<Credentials>,
        secret: Option<String>,
    ) -> Self {
        Store {
            loc,
            http,
            creds,
            secret,
            now: unix_now,
        }
    }

    /// A signed GET of `key` (empty: the bucket) with `query` and `extra` headers.
    fn request(
        &self,
        key: &str,
        query: &[(String, String)],
        extra: &[(String, String)],
    ) -> Result<hyper::Request<Full<Bytes>>, FetchError> {
        let path = self.loc.path(key);
        let qs = sigv4::canonical_query(query);
        let url = if qs.is_empty() {
            format!("{}://{}{path}", self.loc.scheme, self.loc.host())
        } else {
            format!("{}://{}{path}?{qs}", self.loc.scheme, self.loc.host())
        };
        let amz_date = sigv4::amz_date((self.now)());
        let mut headers: Vec<(String, String)> = vec![
            ("host".into(), self.loc.host()),
            ("x-amz-content-sha256".into(), EMPTY_SHA256.into()),
            ("x-amz-date".into(), amz_date.clone()),
        ];
        if let Some(t) = self.creds.as_ref().and_then(|c| c.session_token.clone()) {
            headers.push(("x-amz-security-token".into(), t));
        }
        headers.extend(extra.iter().cloned());
        let mut b = hyper::Request::get(&url);
        for (k, v) in &headers {
            b = b.header(k.as_str(), v.as_str());
        }
        if let Some(c) = &self.creds {
            let r = sigv4::Request {
                method: "GET",
                path: &path,
                query,
                headers: &headers,
                payload_sha256: EMPTY_SHA256,
            };
            b = b.header(
                "authorization",
                sigv4::authorization(c, &self.loc.region, "s3", &amz_date, &r),
            );
        }
        b.body(Full::default())
            .map_err(|e| FetchError::Config(format!("{}: building the request: {e}", url)))
    }

    /// Every object under `prefix` (ListObjectsV2, page by page).
    pub async fn list(&self, prefix: &str) -> Result<Vec<Object>, FetchError> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut q = vec![
                ("list-type".to_string(), "2".to_string()),
                ("prefix".to_string(), prefix.to_string()),
                ("max-keys".to_string(), PAGE_KEYS.to_string()),
            ];
            if let Some(t) = &token {
                q.push(("continuation-token".into(), t.clone()));
            }
            let what = "listing the prefix";
            let url = self.loc.url(prefix);
            let req = self.request("", &q, &[])?;
            let resp = self
                .http
                .open(req, HEAD_TIMEOUT)
                .await
                .map_err(|e| transport(&url, what, e))?;
            let status = resp.status;
            let body = resp
                .read_all(HEAD_TIMEOUT, MAX_XML_BYTES)
                .await
                .map_err(|e| transport(&url, what, e))?;
            if status != 200 {
                return Err(self.refused(&url, what, status, &body));
            }
            let xml = String::from_utf8_lossy(&body);
            out.extend(parse_listing(&xml).map_err(|m| FetchError::Transport {
                url: url.clone(),
                message: format!("{what}: {m}"),
                retriable: false,
            })?);
            let truncated = first_tag(&xml, "IsTruncated").as_deref() == Some("true");
            token = first_tag(&xml, "NextContinuationToken");
            if !truncated || token.is_none() {
                return Ok(out);
            }
        }
    }

    /// GET `obj` from byte `from` (a ranged GET past 0, only while the object still has the
    /// listed ETag). The status is the caller's to check (200, 206, 412, 416); other answers
    /// are refusals.
    pub async fn get(&self, obj: &Object, from: u64) -> Result<Streaming, FetchError> {
        let url = self.loc.url(&obj.key);
        let what = "downloading";
        let mut extra = vec![("x-amz-checksum-mode".to_string(), "ENABLED".to_string())];
        if from > 0 {
            extra.push(("range".into(), format!("bytes={from}-")));
            if let Some(e) = &obj.etag {
                extra.push(("if-match".into(), format!("\"{e}\"")));
            }
        }
        let req = self.request(&obj.key, &[], &extra)?;
        let resp = self
            .http
            .open(req, HEAD_TIMEOUT)
            .await
            .map_err(|e| transport(&url, what, e))?;
        if matches!(resp.status, 200 | 206 | 412 | 416) {
            return Ok(resp);
        }
        let status = resp.status;
        let body = resp
            .read_all(HEAD_TIMEOUT, MAX_XML_BYTES)
            .await
            .unwrap_or_default();
        Err(self.refused(&url, what, status, &body))
    }

    /// A non-success answer: the store's error code and message, with what to fix.
    fn refused(&self, url: &str, what: &'static str, status: u16, body: &[u8]) -> FetchError {
        let xml = String::from_utf8_lossy(body);
        let code = first_tag(&xml, "Code").unwrap_or_else(|| format!("HTTP{status}"));
        let message =
            first_tag(&xml, "Message").unwrap_or_else(|| crate::worker::wire::http::excerpt(body));
        let secret = self
            .secret
            .as_deref()
            .map(|s| format!("Secret {s}"))
            .unwrap_or_else(|| "the credentials Secret".into());
        let hint = match code.as_str() {
            "InvalidAccessKeyId" => format!("the accessKeyId in {secret} is not known to the store"),
            "SignatureDoesNotMatch" => format!(
                "the secretAccessKey in {secret} does not belong to its accessKeyId"
            ),
            "AccessDenied" | "AllAccessDisabled" if self.creds.is_none() => {
                "anonymous access refused: set model.checkpoint.s3.credentialsSecret".into()
            }
            "AccessDenied" => format!("the key in {secret} may not read this bucket or prefix"),
            "NoSuchBucket" => format!(
                "bucket {} does not exist at {}://{}: check model.checkpoint.s3.bucket and endpoint",
                self.loc.bucket, self.loc.scheme, self.loc.authority
            ),
            "NoSuchKey" => "the object went away after it was listed".into(),
            "PermanentRedirect" | "AuthorizationHeaderMalformed" | "IllegalLocationConstraintException" => {
                "the bucket is in another region: check model.checkpoint.s3.region".into()
            }
            "ExpiredToken" | "InvalidToken" => format!("the sessionToken in {secret} expired or is invalid"),
            "RequestTimeTooSkewed" => "this node's clock is off by more than 15 minutes".into(),
            _ => String::new(),
        };
        let retriable = status >= 500 || status == 429 || code == "SlowDown";
        FetchError::Refused {
            url: url.to_string(),
            what,
            status,
            code,
            message,
            hint,
            retriable,
        }
    }
}

fn transport(url: &str, what: &str, e: HttpError) -> FetchError {
    // A certificate that does not verify will not verify on a retry.
    let retriable = !matches!(e, HttpError::Tls { .. });
    FetchError::Transport {
        url: url.to_string(),
        message: format!("{what}: {e}"),
        retriable,
    }
}

/// XML's five entities and numeric character references.
fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let Some(end) = after.find(';').filter(|&e| e <= 10) else {
            out.push('&');
            rest = after;
            continue;
        };
        let ent = &after[..end];
        let c = match ent {
            "amp" => Some('&'),
            "lt" => Some('<'),
            "gt" => Some('>'),
            "quot" => Some('"'),
            "apos" => Some('\''),
            _ => ent
                .strip_prefix("#x")
                .and_then(|h| u32::from_str_radix(h, 16).ok())
                .or_else(|| ent.strip_prefix('#').and_then(|d| d.parse().ok()))
                .and_then(char::from_u32),
        };
        match c {
            Some(c) => {
                out.push(c);
                rest = &after[end + 1..];
            }
            None => {
                out.push('&');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// The text of the first `<tag>...</tag>` in `xml`, unescaped.
pub fn first_tag(xml: &str, tag: &str) -> Option<String> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let start = xml.find(&open)? + open.len();
    let end = xml[start..].find(&close)? + start;
    Some(unescape(&xml[start..end]))
}

/// The objects of a ListObjectsV2 page.
pub fn parse_listing(xml: &str) -> Result<Vec<Object>, String> {
    if !xml.contains("<ListBucketResult") {
        return Err(format!(
            "the answer is not a ListBucketResult: {}",
            crate::worker::wire::http::excerpt(xml.as_bytes())
        ));
    }
    let mut out = Vec::new();
    for block in xml.split("<Contents>").skip(1) {
        let block = block.split("</Contents>").next().unwrap_or("");
        let key = first_tag(block, "Key").ok_or("a <Contents> without <Key>")?;
        let size = first_tag(block, "Size")
            .and_then(|s| s.trim().parse::<u64>().ok())
            .ok_or_else(|| format!("object {key:?}: no readable <Size>"))?;
        let etag = first_tag(block, "ETag")
            .map(|e| e.trim().trim_matches('"').to_string())
            .filter(|e| !e.is_empty());
        out.push(Object { key, size, etag });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listing_pages_parse() {
        let xml = r#"<?xml version="1.0" encoding="UTF-8"?>
<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Name>weights</Name>
<Prefix>m/</Prefix><KeyCount>2</KeyCount><IsTruncated>true</IsTruncated>
<NextContinuationToken>1a&amp;2</NextContinuationToken>
<Contents><Key>m/a &amp; b.safetensors</Key><ETag>&quot;b1946ac92492d2347c6235b4d2611184&quot;</ETag><Size>6</Size></Contents>
<Contents><Key>m/config.json</Key><Size>12</Size></Contents></ListBucketResult>"#;
        let objs = parse_listing(xml).unwrap();
        assert_eq!(
            objs,
            vec![
                Object {
                    key: "m/a & b.safetensors".into(),
                    size: 6,
                    etag: Some("b1946ac92492d2347c6235b4d2611184".into())
                },
                Object {
                    key: "m/config.json".into(),
                    size: 12,
                    etag: None
                }
            ]
        );
        assert_eq!(first_tag(xml, "IsTruncated").as_deref(), Some("true"));
        assert_eq!(
            first_tag(xml, "NextContinuationToken").as_deref(),
            Some("1a&2")
        );
        assert!(parse_listing("<Error><Code>X</Code></Error>").is_err());
        assert!(parse_listing(
            "<ListBucketResult><Contents><Key>k</Key></Contents></ListBucketResult>"
        )
        .unwrap_err()
        .contains("Size"));
    }

    #[test]
    fn endpoints() {
        let l = Location::new("http://127.0.0.1:9000", "us-east-1", "w", true).unwrap();
        assert_eq!(
            (l.host(), l.path("m/x")),
            ("127.0.0.1:9000".into(), "/w/m/x".into())
        );
        let v = Location::new(
            "https://s3.eu-west-1.amazonaws.com/",
            "eu-west-1",
            "w",
            false,
        )
        .unwrap();
        assert_eq!(
            (v.host(), v.path("m/x")),
            ("w.s3.eu-west-1.amazonaws.com".into(), "/m/x".into())
        );
        for bad in [
            "ftp://x",
            "s3.amazonaws.com",
            "http://h/path",
            "http://u:p@h",
        ] {
            assert!(Location::new(bad, "r", "w", true).is_err(), "{bad}");
        }
        assert_eq!(unescape("a&#65;&#x42;&bogus;&"), "aAB&bogus;&");
    }
}
