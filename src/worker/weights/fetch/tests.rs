//! The fetcher against a small S3-like server on 127.0.0.1 that can cut a body short, refuse,
//! or serve bytes that do not match their ETag (a real store never does these on request; the
//! e2e test in tests/e2e_s3.rs runs the fetcher against a real S3-compatible server).

use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;
use crate::worker::weights::s3::Location;

#[derive(Clone)]
struct Obj {
    key: String,
    body: Vec<u8>,
    /// The ETag the server claims (default: the body's MD5).
    etag: Option<String>,
}

#[derive(Default)]
struct Behaviour {
    /// Bytes sent of the first GET of each object before the connection is closed.
    cut_first_get_at: Option<usize>,
    /// Answer every request with this status and S3 error code.
    refuse: Option<(u16, &'static str)>,
}

/// One request as the fake saw it: request line, Range, If-Match, whether it had Authorization.
type Seen = (String, Option<String>, Option<String>, bool);

struct Fake {
    port: u16,
    seen: Arc<Mutex<Vec<Seen>>>,
}

fn md5_hex(b: &[u8]) -> String {
    let mut m = Md5::new();
    m.update(b);
    hex::encode(m.finish())
}

async fn fake(objs: Vec<Obj>, behaviour: Behaviour) -> Fake {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    let behaviour = Arc::new(behaviour);
    let got_first: Arc<Mutex<std::collections::HashSet<String>>> = Default::default();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            let (objs, seen, b, got_first) = (
                objs.clone(),
                seen2.clone(),
                behaviour.clone(),
                got_first.clone(),
            );
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&buf).to_string();
                let line = head.lines().next().unwrap_or("").to_string();
                let header = |name: &str| {
                    head.lines().skip(1).find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.trim()
                            .eq_ignore_ascii_case(name)
                            .then(|| v.trim().to_string())
                    })
                };
                let (range, if_match) = (header("range"), header("if-match"));
                seen.lock().unwrap().push((
                    line.clone(),
                    range.clone(),
                    if_match.clone(),
                    header("authorization").is_some(),
                ));
                let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
                let out: Vec<u8> = if let Some((status, code)) = b.refuse {
                    let body = format!("<Error><Code>{code}</Code><Message>no</Message></Error>");
                    format!(
                        "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    )
                    .into_bytes()
                } else if path == "/bkt" || path.starts_with("/bkt?") {
                    let mut xml =
                        String::from("<ListBucketResult><IsTruncated>false</IsTruncated>");
                    for o in &objs {
                        xml.push_str(&format!(
                            "<Contents><Key>{}</Key><Size>{}</Size><ETag>&quot;{}&quot;</ETag></Contents>",
                            o.key,
                            o.body.len(),
                            o.etag.clone().unwrap_or_else(|| md5_hex(&o.body))
                        ));
                    }
                    xml.push_str("</ListBucketResult>");
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{xml}",
                        xml.len()
                    )
                    .into_bytes()
                } else {
                    let key = path.trim_start_matches("/bkt/");
                    let Some(o) = objs.iter().find(|o| o.key == key) else {
                        return;
                    };
                    let etag = o.etag.clone().unwrap_or_else(|| md5_hex(&o.body));
                    let from: usize = range
                        .as_deref()
                        .and_then(|r| r.strip_prefix("bytes="))
                        .and_then(|r| r.trim_end_matches('-').parse().ok())
                        .unwrap_or(0);
                    if if_match
                        .as_deref()
                        .is_some_and(|m| m.trim_matches('"') != etag)
                    {
                        b"HTTP/1.1 412 Precondition Failed\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec()
                    } else {
                        let body = &o.body[from..];
                        let mut h = if from > 0 {
                            format!(
                                "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {from}-{}/{}\r\n",
                                o.body.len() - 1,
                                o.body.len()
                            )
                        } else {
                            "HTTP/1.1 200 OK\r\n".to_string()
                        };
                        h.push_str(&format!(
                            "ETag: \"{etag}\"\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                            body.len()
                        ));
                        let mut out = h.into_bytes();
                        let first = got_first.lock().unwrap().insert(o.key.clone());
                        match b.cut_first_get_at {
                            Some(n) if first => out.extend_from_slice(&body[..n.min(body.len())]),
                            _ => out.extend_from_slice(body),
                        }
                        out
                    }
                };
                let _ = s.write_all(&out).await;
                let _ = s.shutdown().await;
            });
        }
    });
    Fake { port, seen }
}

fn store(port: u16) -> Store {
    let loc = Location::new(
        &format!("http://127.0.0.1:{port}"),
        "us-east-1",
        "bkt",
        true,
    )
    .unwrap();
    let creds = Credentials {
        access_key_id: "AKID".into(),
        secret_access_key: "SECRET".into(),
        session_token: None,
    };
    Store::new(
        loc,
        HttpClient::new(),
        Some(creds),
        Some("weights-creds".into()),
    )
}

fn args(dest: &Path) -> FetchArgs {
    FetchArgs {
        endpoint: String::new(),
        region: "us-east-1".into(),
        bucket: "bkt".into(),
        prefix: "m/".into(),
        dest: dest.to_path_buf(),
        path_style: true,
        credentials_dir: None,
        credentials_secret: None,
        concurrency: 2,
        retries: 2,
        idle_timeout_seconds: 5,
        instance: "w-0".into(),
    }
}

fn bytes(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 31 % 251) as u8).collect()
}

/// A whole safetensors file: one F32 tensor of `n` elements.
fn safetensors(n: usize) -> Vec<u8> {
    let header = format!(
        r#"{{"w":{{"dtype":"F32","shape":[{n}],"data_offsets":[0,{}]}}}}"#,
        4 * n
    );
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend(std::iter::repeat_n(7u8, 4 * n));
    out
}

#[tokio::test]
async fn a_cut_download_resumes_with_a_range_and_a_rerun_uses_the_cache() {
    let big = bytes(300_000);
    let objs = vec![
        Obj {
            key: "m/model.bin".into(),
            body: big.clone(),
            etag: None,
        },
        Obj {
            key: "m/sub/config.json".into(),
            body: b"{}".to_vec(),
            etag: None,
        },
    ];
    let srv = fake(
        objs,
        Behaviour {
            cut_first_get_at: Some(100_000),
            ..Default::default()
        },
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("ckpt");
    let a = args(&dest);
    let s = fetch(&store(srv.port), "m/", &dest, &a).await.unwrap();
    assert_eq!((s.objects, s.downloaded, s.cached), (2, 2, 0), "{s:?}");
    assert_eq!(s.resumed, 1, "the first GET of model.bin was cut: {s:?}");
    assert_eq!(std::fs::read(dest.join("model.bin")).unwrap(), big);
    assert_eq!(std::fs::read(dest.join("sub/config.json")).unwrap(), b"{}");
    let seen = srv.seen.lock().unwrap().clone();
    assert!(
        seen.iter().all(|r| r.3),
        "every request is signed: {seen:?}"
    );
    let resumed: Vec<_> = seen
        .iter()
        .filter(|r| r.0.contains("/bkt/m/model.bin"))
        .collect();
    assert_eq!(resumed.len(), 2, "{seen:?}");
    assert_eq!(resumed[1].1.as_deref(), Some("bytes=100000-"));
    assert_eq!(
        resumed[1].2.as_deref(),
        Some(&*format!("\"{}\"", md5_hex(&big)))
    );
    // Nothing left behind but the files and the manifest.
    let mut names: Vec<String> = std::fs::read_dir(&dest)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    names.sort();
    assert_eq!(names, [MANIFEST, "model.bin", "sub"]);

    // A rerun (a restarted init container, a persistent cache) downloads nothing.
    let before = srv.seen.lock().unwrap().len();
    let s = fetch(&store(srv.port), "m/", &dest, &a).await.unwrap();
    assert_eq!((s.downloaded, s.cached), (0, 2), "{s:?}");
    assert_eq!(
        srv.seen.lock().unwrap().len(),
        before + 1,
        "only the listing"
    );
}

#[tokio::test]
async fn a_partial_file_from_an_earlier_run_is_continued() {
    let big = bytes(50_000);
    let objs = vec![Obj {
        key: "m/a.bin".into(),
        body: big.clone(),
        etag: None,
    }];
    let srv = fake(objs, Behaviour::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().to_path_buf();
    let (partial, meta) = partial_paths(&dest.join("a.bin"), "w-0");
    assert!(partial.ends_with("a.bin.partial.w-0"), "{partial:?}");
    // Another pod's partial file of the same object is not touched.
    let (other, _) = partial_paths(&dest.join("a.bin"), "w-1");
    std::fs::write(&other, b"junk").unwrap();
    std::fs::write(&partial, &big[..12_345]).unwrap();
    let e = Expected {
        md5: Some(md5_hex(&big)),
        ..Default::default()
    };
    std::fs::write(&meta, serde_json::to_vec(&e).unwrap()).unwrap();
    let s = fetch(&store(srv.port), "m/", &dest, &args(&dest))
        .await
        .unwrap();
    assert_eq!(s.resumed, 1);
    assert_eq!(std::fs::read(dest.join("a.bin")).unwrap(), big);
    let seen = srv.seen.lock().unwrap().clone();
    assert_eq!(
        seen.last().unwrap().1.as_deref(),
        Some("bytes=12345-"),
        "{seen:?}"
    );
}

#[tokio::test]
async fn bytes_that_do_not_match_the_etag_fail_naming_the_object() {
    let objs = vec![Obj {
        key: "m/a.bin".into(),
        body: bytes(1000),
        etag: Some("00000000000000000000000000000000".into()),
    }];
    let srv = fake(objs, Behaviour::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut a = args(dir.path());
    a.retries = 0;
    let e = fetch(&store(srv.port), "m/", dir.path(), &a)
        .await
        .unwrap_err();
    let m = e.to_string();
    assert!(
        m.starts_with("s3://bkt/m/a.bin: integrity check failed: "),
        "{m}"
    );
    assert!(
        m.contains("the store's ETag is 00000000000000000000000000000000"),
        "{m}"
    );
    assert!(!dir.path().join("a.bin").exists());
}

#[tokio::test]
async fn a_truncated_safetensors_object_fails_without_retrying() {
    let whole = safetensors(1000);
    let cut = whole[..whole.len() / 2].to_vec();
    let objs = vec![Obj {
        key: "m/model.safetensors".into(),
        body: cut,
        etag: None,
    }];
    let srv = fake(objs, Behaviour::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let e = fetch(&store(srv.port), "m/", dir.path(), &args(dir.path()))
        .await
        .unwrap_err();
    let m = e.to_string();
    assert!(!e.retriable());
    assert!(m.starts_with("s3://bkt/m/model.safetensors: integrity check failed: the stored object is not a whole safetensors file"), "{m}");
    assert!(m.contains("truncated"), "{m}");
    assert_eq!(srv.seen.lock().unwrap().len(), 2, "one listing, one GET");
}

#[tokio::test]
async fn refusals_name_the_cause_and_what_to_fix() {
    for (status, code, want) in [
        (
            403,
            "SignatureDoesNotMatch",
            "the secretAccessKey in Secret weights-creds does not belong to its accessKeyId",
        ),
        (
            403,
            "InvalidAccessKeyId",
            "the accessKeyId in Secret weights-creds is not known to the store",
        ),
        (
            404,
            "NoSuchBucket",
            "bucket bkt does not exist at http://127.0.0.1:",
        ),
    ] {
        let srv = fake(
            vec![],
            Behaviour {
                refuse: Some((status, code)),
                ..Default::default()
            },
        )
        .await;
        let dir = tempfile::tempdir().unwrap();
        let e = fetch(&store(srv.port), "m/", dir.path(), &args(dir.path()))
            .await
            .unwrap_err();
        let m = e.to_string();
        assert!(!e.retriable(), "{m}");
        assert!(
            m.starts_with(&format!(
                "s3://bkt/m/: listing the prefix: HTTP {status} {code}: no ("
            )),
            "{m}"
        );
        assert!(m.contains(want), "{m}");
    }
}

#[tokio::test]
async fn an_empty_prefix_is_an_error() {
    let srv = fake(vec![], Behaviour::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let m = fetch(&store(srv.port), "m/", dir.path(), &args(dir.path()))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        m.contains("s3://bkt/m/: no objects under this prefix"),
        "{m}"
    );
}

#[tokio::test]
async fn an_unreachable_store_is_retried_then_named() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let dir = tempfile::tempdir().unwrap();
    let e = fetch(&store(port), "m/", dir.path(), &args(dir.path()))
        .await
        .unwrap_err();
    let m = e.to_string();
    assert!(
        e.retriable() && m.starts_with("s3://bkt/m/: listing the prefix: GET http://127.0.0.1:"),
        "{m}"
    );
}

#[test]
fn keys_map_inside_the_cache() {
    assert_eq!(
        relative_path("m/", "m/a/b.bin").unwrap(),
        Some(PathBuf::from("a/b.bin"))
    );
    assert_eq!(
        relative_path("m", "m/a.bin").unwrap(),
        Some(PathBuf::from("a.bin"))
    );
    assert_eq!(relative_path("m/", "m/dir/").unwrap(), None);
    assert_eq!(
        relative_path("", "x.bin").unwrap(),
        Some(PathBuf::from("x.bin"))
    );
    for bad in [
        "m/../etc/passwd",
        "m/a/./b",
        "m/a//b",
        "m/x.partial",
        "m/x.partial.w-0",
        "m/.moe-fetch.json",
    ] {
        assert!(relative_path("m/", bad).is_err(), "{bad}");
    }
}

#[test]
fn credentials_come_in_pairs() {
    let env = |pairs: &'static [(&'static str, &'static str)]| {
        move |k: &str| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    };
    assert!(env_credentials(env(&[])).unwrap().is_none());
    let c = env_credentials(env(&[
        ("AWS_ACCESS_KEY_ID", "a"),
        ("AWS_SECRET_ACCESS_KEY", "b"),
    ]))
    .unwrap()
    .unwrap();
    assert_eq!((c.access_key_id.as_str(), c.session_token), ("a", None));
    let m = env_credentials(env(&[("AWS_ACCESS_KEY_ID", "a")]))
        .unwrap_err()
        .to_string();
    assert!(m.contains("secretAccessKey"), "{m}");

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("accessKeyId"), "AKID\n").unwrap();
    let m = dir_credentials(dir.path(), Some("creds"))
        .unwrap_err()
        .to_string();
    assert_eq!(m, "Secret creds has no (or an empty) key secretAccessKey: it needs accessKeyId and secretAccessKey");
    std::fs::write(dir.path().join("secretAccessKey"), "S").unwrap();
    let c = dir_credentials(dir.path(), Some("creds")).unwrap();
    assert_eq!(
        (c.access_key_id.as_str(), c.secret_access_key.as_str()),
        ("AKID", "S")
    );
}
