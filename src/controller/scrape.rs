//! The operator's HTTP/1.1 client for the workers: `GET /metrics` (load and plan hash) and
//! `PUT /v1/plan` (in-place rollout), and Prometheus' `/api/v1/query`. Workers and Prometheus are
//! plain HTTP inside the cluster, so a small client over a TCP stream does; each request uses its
//! own connection (`Connection: close`) and a deadline.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::load::{parse_worker_metrics, WorkerSample};

/// One series of a Prometheus instant vector: its labels and value.
pub type Series = (std::collections::BTreeMap<String, String>, f64);

/// Largest response read (a worker's `/metrics` with many experts is well below this).
const MAX_RESPONSE_BYTES: usize = 64 << 20;

/// Why a request failed; `reason` is the CamelCase reason for conditions and the metric label.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("{target}: {message}")]
    Unreachable { target: String, message: String },
    #[error("{target}: HTTP {status}: {body}")]
    Status {
        target: String,
        status: u16,
        body: String,
    },
    #[error("{target}: {message}")]
    Garbled { target: String, message: String },
}

impl HttpError {
    pub fn reason(&self) -> &'static str {
        match self {
            HttpError::Unreachable { .. } => "Unreachable",
            HttpError::Status { .. } => "HttpError",
            HttpError::Garbled { .. } => "GarbledResponse",
        }
    }
}

/// A response: status code and body.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

/// One request to `host:port` (`host` may be an IP or a name). `headers` are extra header lines.
pub async fn request(
    method: &str,
    host: &str,
    port: u16,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    timeout: Duration,
) -> Result<Response, HttpError> {
    let target = format!("{method} http://{host}:{port}{path}");
    let unreachable = |message: String| HttpError::Unreachable {
        target: target.clone(),
        message,
    };
    let run = async {
        let mut stream = TcpStream::connect((host, port))
            .await
            .map_err(|e| unreachable(format!("connect: {e}")))?;
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\nContent-Length: {}\r\n",
            body.len()
        );
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        stream
            .write_all(head.as_bytes())
            .await
            .map_err(|e| unreachable(format!("write: {e}")))?;
        stream
            .write_all(body)
            .await
            .map_err(|e| unreachable(format!("write: {e}")))?;
        let mut raw = Vec::new();
        (&mut stream)
            .take(MAX_RESPONSE_BYTES as u64 + 1)
            .read_to_end(&mut raw)
            .await
            .map_err(|e| unreachable(format!("read: {e}")))?;
        Ok(raw)
    };
    let raw = tokio::time::timeout(timeout, run)
        .await
        .map_err(|_| unreachable(format!("no answer within {timeout:?}")))??;
    parse_response(&raw).map_err(|message| HttpError::Garbled { target, message })
}

/// Parse an HTTP/1.1 response read to EOF (content-length, chunked or close-delimited body).
pub fn parse_response(raw: &[u8]) -> Result<Response, String> {
    if raw.len() > MAX_RESPONSE_BYTES {
        return Err(format!("response larger than {MAX_RESPONSE_BYTES} bytes"));
    }
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("no end of the response head")?;
    let head = std::str::from_utf8(&raw[..end]).map_err(|_| "response head is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let mut chunked = false;
    let mut length = None;
    for l in lines {
        let Some((k, v)) = l.split_once(':') else {
            continue;
        };
        let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
        if k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked") {
            chunked = true;
        } else if k == "content-length" {
            length = Some(v.parse::<usize>().map_err(|_| "bad content-length")?);
        }
    }
    let rest = &raw[end + 4..];
    let body = if chunked {
        dechunk(rest)?
    } else if let Some(n) = length {
        rest.get(..n)
            .ok_or("body shorter than content-length")?
            .to_vec()
    } else {
        rest.to_vec()
    };
    Ok(Response { status, body })
}

fn dechunk(mut rest: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let eol = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("truncated chunk size")?;
        let size_text = std::str::from_utf8(&rest[..eol]).map_err(|_| "bad chunk size")?;
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| format!("bad chunk size {size_text:?}"))?;
        rest = &rest[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        out.extend_from_slice(rest.get(..size).ok_or("truncated chunk")?);
        rest = rest.get(size + 2..).ok_or("truncated chunk")?;
    }
}

fn ok_body(target: String, r: Response) -> Result<Vec<u8>, HttpError> {
    if (200..300).contains(&r.status) {
        Ok(r.body)
    } else {
        Err(HttpError::Status {
            target,
            status: r.status,
            body: String::from_utf8_lossy(&r.body).chars().take(300).collect(),
        })
    }
}

/// Scrape one worker's `/metrics`.
pub async fn scrape_worker(
    ip: &str,
    port: u16,
    timeout: Duration,
) -> Result<WorkerSample, HttpError> {
    let target = format!("GET http://{ip}:{port}/metrics");
    let r = request("GET", ip, port, "/metrics", &[], &[], timeout).await?;
    let body = ok_body(target.clone(), r)?;
    let text = String::from_utf8(body).map_err(|_| HttpError::Garbled {
        target: target.clone(),
        message: "body is not UTF-8".into(),
    })?;
    parse_worker_metrics(&text).map_err(|e| HttpError::Garbled {
        target,
        message: e.to_string(),
    })
}

/// Push a plan (its JSON) to one worker's admin API.
pub async fn put_plan(
    ip: &str,
    port: u16,
    token: &str,
    plan_json: &[u8],
    timeout: Duration,
) -> Result<(), HttpError> {
    let auth = format!("Bearer {token}");
    let headers = [
        ("Authorization", auth.as_str()),
        ("Content-Type", "application/json"),
    ];
    let target = format!("PUT http://{ip}:{port}/v1/plan");
    let r = request("PUT", ip, port, "/v1/plan", &headers, plan_json, timeout).await?;
    ok_body(target, r).map(|_| ())
}

/// Split `http://host[:port][/prefix]` into host, port and path prefix.
pub fn split_url(url: &str) -> Result<(String, u16, String), String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url:?}: only http:// URLs are supported"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].trim_end_matches('/').to_string()),
        None => (rest, String::new()),
    };
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) => (
            h.to_string(),
            p.parse().map_err(|_| format!("{url:?}: bad port {p:?}"))?,
        ),
        None => (authority.to_string(), 80),
    };
    if host.is_empty() {
        return Err(format!("{url:?} has no host"));
    }
    Ok((host, port, path))
}

/// Percent-encode a query parameter value.
fn encode(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Run an instant query against Prometheus' HTTP API; returns `(labels, value)` per series.
pub async fn prometheus_query(
    url: &str,
    query: &str,
    timeout: Duration,
) -> Result<Vec<Series>, HttpError> {
    let garbled = |message: String| HttpError::Garbled {
        target: format!("GET {url}/api/v1/query"),
        message,
    };
    let (host, port, prefix) = split_url(url).map_err(garbled)?;
    let path = format!("{prefix}/api/v1/query?query={}", encode(query));
    let target = format!("GET {url}/api/v1/query");
    let r = request("GET", &host, port, &path, &[], &[], timeout).await?;
    let body = ok_body(target, r)?;
    parse_prometheus_vector(&body).map_err(garbled)
}

/// Parse an instant-vector answer of `/api/v1/query`.
pub fn parse_prometheus_vector(body: &[u8]) -> Result<Vec<Series>, String> {
    #[derive(serde::Deserialize)]
    struct Answer {
        status: String,
        #[serde(default)]
        error: Option<String>,
        #[serde(default)]
        data: Option<Data>,
    }
    #[derive(serde::Deserialize)]
    struct Data {
        #[serde(rename = "resultType")]
        result_type: String,
        result: Vec<PromSeries>,
    }
    #[derive(serde::Deserialize)]
    struct PromSeries {
        metric: std::collections::BTreeMap<String, String>,
        value: (f64, String),
    }
    let a: Answer =
        serde_json::from_slice(body).map_err(|e| format!("not a Prometheus answer: {e}"))?;
    if a.status != "success" {
        return Err(format!(
            "query failed: {}",
            a.error.unwrap_or_else(|| a.status.clone())
        ));
    }
    let d = a.data.ok_or("answer has no data")?;
    if d.result_type != "vector" {
        return Err(format!(
            "query returns a {}, not an instant vector: sum by (layer, expert) a counter",
            d.result_type
        ));
    }
    d.result
        .into_iter()
        .map(|s| {
            let v: f64 = s
                .value
                .1
                .parse()
                .map_err(|_| format!("sample value {:?}", s.value.1))?;
            Ok((s.metric, v))
        })
        .collect()
}

/// Turn a Prometheus vector of `{layer, expert}` counters into one sample, as if scraped from
/// one worker that holds every expert.
pub fn sample_from_prometheus(
    series: &[(std::collections::BTreeMap<String, String>, f64)],
) -> Result<WorkerSample, String> {
    let mut s = WorkerSample::default();
    for (labels, v) in series {
        let get = |k: &str| -> Result<u32, String> {
            labels
                .get(k)
                .ok_or_else(|| {
                    format!("series {labels:?} has no {k} label: sum by (layer, expert)")
                })?
                .parse()
                .map_err(|_| format!("series {labels:?}: {k} is not a number"))
        };
        *s.tokens
            .entry((get("layer")?, get("expert")?))
            .or_insert(0.0) += v;
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_length_chunked_and_close_delimited_bodies() {
        let r = parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nabcdef").unwrap();
        assert_eq!((r.status, r.body.as_slice()), (200, &b"abc"[..]));
        let r = parse_response(
            b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!((r.status, r.body.as_slice()), (503, &b"abcde"[..]));
        let r = parse_response(b"HTTP/1.0 200 OK\r\n\r\nall of it").unwrap();
        assert_eq!(r.body, b"all of it");
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n").is_err());
        assert!(parse_response(b"garbage\r\n\r\n").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\nab").is_err());
    }

    #[test]
    fn urls_and_prometheus_answers() {
        assert_eq!(
            split_url("http://prom.monitoring:9090/").unwrap(),
            ("prom.monitoring".into(), 9090, String::new())
        );
        assert_eq!(
            split_url("http://p/prefix").unwrap(),
            ("p".into(), 80, "/prefix".into())
        );
        assert!(split_url("https://p").is_err());
        assert_eq!(encode("sum(x{a=\"b\"})"), "sum%28x%7Ba%3D%22b%22%7D%29");
        let body = br#"{"status":"success","data":{"resultType":"vector","result":[
            {"metric":{"layer":"1","expert":"0"},"value":[1.5,"10"]},
            {"metric":{"layer":"1","expert":"0","pod":"b"},"value":[1.5,"5"]},
            {"metric":{"layer":"1","expert":"3"},"value":[1.5,"2.5"]}]}}"#;
        let v = parse_prometheus_vector(body).unwrap();
        let s = sample_from_prometheus(&v).unwrap();
        assert_eq!(s.tokens[&(1, 0)], 15.0);
        assert_eq!(s.tokens[&(1, 3)], 2.5);
        let err =
            parse_prometheus_vector(br#"{"status":"error","error":"parse error"}"#).unwrap_err();
        assert!(err.contains("parse error"), "{err}");
        let missing = vec![(
            std::collections::BTreeMap::from([("layer".to_string(), "1".to_string())]),
            1.0,
        )];
        assert!(sample_from_prometheus(&missing)
            .unwrap_err()
            .contains("expert"));
    }

    #[tokio::test]
    async fn refused_connection_is_unreachable() {
        // A socket bound but never listening holds a port that refuses connections, and no
        // other test can take it meanwhile (as it could a port bound and released).
        let held = tokio::net::TcpSocket::new_v4().unwrap();
        held.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let port = held.local_addr().unwrap().port();
        let e = scrape_worker("127.0.0.1", port, Duration::from_secs(2))
            .await
            .unwrap_err();
        assert_eq!(e.reason(), "Unreachable");
    }
}
