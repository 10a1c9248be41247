//! AWS Signature Version 4 for S3 requests without a body (GET): the canonical request, the
//! string to sign, the signing key and the `Authorization` header. Pure: the time comes in.
//!
//! <https://docs.aws.amazon.com/IAM/latest/UserGuide/reference_sigv-create-signed-request.html>;
//! the tests check the published examples (the S3 "GET object" and "list objects" examples and
//! the SigV4 test suite's `get-vanilla`).

use ring::hmac;
use sha2::{Digest, Sha256};

pub const ALGORITHM: &str = "AWS4-HMAC-SHA256";
/// SHA-256 of the empty body, the `x-amz-content-sha256` of a GET.
pub const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// An access key. `Debug` never shows the secret or the session token.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    /// A temporary credential's token (`x-amz-security-token`).
    pub session_token: Option<String>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key_id", &self.access_key_id)
            .finish_non_exhaustive()
    }
}

/// What is signed of a request.
#[derive(Clone, Debug)]
pub struct Request<'a> {
    pub method: &'a str,
    /// The path as sent: each segment already URI-encoded ([`encode_path`]).
    pub path: &'a str,
    /// Query parameters, not encoded (the canonical form encodes and sorts them).
    pub query: &'a [(String, String)],
    /// Headers to sign: names lower-case, values as sent. `host` must be among them.
    pub headers: &'a [(String, String)],
    /// Hex SHA-256 of the payload (or `UNSIGNED-PAYLOAD`).
    pub payload_sha256: &'a str,
}

/// RFC 3986 unreserved characters stay; everything else is `%XX` (upper-case hex). `/` stays
/// when `keep_slash` (object key paths), and is encoded otherwise (query values).
pub fn uri_encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            b'/' if keep_slash => out.push('/'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// The path of an object key (or of a bucket, `key` empty): `/` then the key, URI-encoded once
/// (S3 does not double-encode).
pub fn encode_path(prefix: &str, key: &str) -> String {
    let mut p = String::from("/");
    if !prefix.is_empty() {
        p.push_str(&uri_encode(prefix, false));
        if key.is_empty() {
            // The bucket itself: `/bucket`, as S3's path-style ListObjectsV2 is addressed.
            return p;
        }
        p.push('/');
    }
    p.push_str(&uri_encode(key, true));
    p
}

/// The canonical query string: parameters encoded, sorted by name then value, joined by `&`.
/// Also what goes on the wire, so the signed and the sent query are the same.
pub fn canonical_query(query: &[(String, String)]) -> String {
    let mut q: Vec<(String, String)> = query
        .iter()
        .map(|(k, v)| (uri_encode(k, false), uri_encode(v, false)))
        .collect();
    q.sort();
    q.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

/// Header names (sorted, `;`-joined) and the canonical header block.
fn canonical_headers(headers: &[(String, String)]) -> (String, String) {
    let mut h: Vec<(String, String)> = headers
        .iter()
        .map(|(k, v)| {
            // Trim, and fold inner runs of spaces to one.
            let v = v.split_whitespace().collect::<Vec<_>>().join(" ");
            (k.to_ascii_lowercase(), v)
        })
        .collect();
    h.sort();
    let names = h
        .iter()
        .map(|(k, _)| k.as_str())
        .collect::<Vec<_>>()
        .join(";");
    let block: String = h.iter().map(|(k, v)| format!("{k}:{v}\n")).collect();
    (names, block)
}

pub fn canonical_request(r: &Request<'_>) -> String {
    let (names, block) = canonical_headers(r.headers);
    format!(
        "{}\n{}\n{}\n{}\n{}\n{}",
        r.method,
        r.path,
        canonical_query(r.query),
        block,
        names,
        r.payload_sha256
    )
}

/// `YYYYMMDD/region/service/aws4_request` for an `amz_date` of `YYYYMMDDTHHMMSSZ`.
pub fn scope(amz_date: &str, region: &str, service: &str) -> String {
    format!(
        "{}/{region}/{service}/aws4_request",
        &amz_date[..8.min(amz_date.len())]
    )
}

pub fn string_to_sign(amz_date: &str, scope: &str, canonical: &str) -> String {
    format!(
        "{ALGORITHM}\n{amz_date}\n{scope}\n{}",
        hex::encode(Sha256::digest(canonical.as_bytes()))
    )
}

fn hmac_sha256(key: &[u8], msg: &[u8]) -> Vec<u8> {
    hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), msg)
        .as_ref()
        .to_vec()
}

/// The signing key: HMAC chain of the date, region, service and `aws4_request`.
pub fn signing_key(secret: &str, date: &str, region: &str, service: &str) -> Vec<u8> {
    let k = hmac_sha256(format!("AWS4{secret}").as_bytes(), date.as_bytes());
    let k = hmac_sha256(&k, region.as_bytes());
    let k = hmac_sha256(&k, service.as_bytes());
    hmac_sha256(&k, b"aws4_request")
}

/// The hex signature of `r` at `amz_date`.
pub fn signature(
    creds: &Credentials,
    region: &str,
    service: &str,
    amz_date: &str,
    r: &Request<'_>,
) -> String {
    let scope = scope(amz_date, region, service);
    let sts = string_to_sign(amz_date, &scope, &canonical_request(r));
    let key = signing_key(&creds.secret_access_key, &amz_date[..8], region, service);
    hex::encode(hmac_sha256(&key, sts.as_bytes()))
}

/// The `Authorization` header of `r` at `amz_date`.
pub fn authorization(
    creds: &Credentials,
    region: &str,
    service: &str,
    amz_date: &str,
    r: &Request<'_>,
) -> String {
    let (names, _) = canonical_headers(r.headers);
    format!(
        "{ALGORITHM} Credential={}/{}, SignedHeaders={names}, Signature={}",
        creds.access_key_id,
        scope(amz_date, region, service),
        signature(creds, region, service, amz_date, r)
    )
}

/// `YYYYMMDDTHHMMSSZ` of a Unix time (seconds).
pub fn amz_date(unix_s: i64) -> String {
    let ts = k8s_openapi::jiff::Timestamp::from_second(unix_s)
        .unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH);
    ts.strftime("%Y%m%dT%H%M%SZ").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// The S3 docs' example credentials (Signature Calculations for the Authorization Header).
    fn s3_example() -> Credentials {
        Credentials {
            access_key_id: "AKIAIOSFODNN7EXAMPLE".into(),
            secret_access_key: "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY".into(),
            session_token: None,
        }
    }

    #[test]
    fn s3_get_object_example() {
        // GET /test.txt with Range: bytes=0-9, 24 May 2013: the published signature.
        let headers = h(&[
            ("Host", "examplebucket.s3.amazonaws.com"),
            ("Range", "bytes=0-9"),
            ("x-amz-content-sha256", EMPTY_SHA256),
            ("x-amz-date", "20130524T000000Z"),
        ]);
        let r = Request {
            method: "GET",
            path: "/test.txt",
            query: &[],
            headers: &headers,
            payload_sha256: EMPTY_SHA256,
        };
        let auth = authorization(&s3_example(), "us-east-1", "s3", "20130524T000000Z", &r);
        assert_eq!(
            auth,
            "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, \
             SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, \
             Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
        );
    }

    #[test]
    fn s3_list_objects_example() {
        // GET /?max-keys=2&prefix=J (the parameters given out of order: the canonical query
        // sorts them).
        let headers = h(&[
            ("host", "examplebucket.s3.amazonaws.com"),
            ("x-amz-content-sha256", EMPTY_SHA256),
            ("x-amz-date", "20130524T000000Z"),
        ]);
        let query = vec![
            ("prefix".to_string(), "J".to_string()),
            ("max-keys".to_string(), "2".to_string()),
        ];
        let r = Request {
            method: "GET",
            path: "/",
            query: &query,
            headers: &headers,
            payload_sha256: EMPTY_SHA256,
        };
        assert_eq!(
            signature(&s3_example(), "us-east-1", "s3", "20130524T000000Z", &r),
            "34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7"
        );
    }

    #[test]
    fn sigv4_test_suite_get_vanilla() {
        let creds = Credentials {
            access_key_id: "AKIDEXAMPLE".into(),
            secret_access_key: "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY".into(),
            session_token: None,
        };
        let headers = h(&[
            ("host", "example.amazonaws.com"),
            ("x-amz-date", "20150830T123600Z"),
        ]);
        let r = Request {
            method: "GET",
            path: "/",
            query: &[],
            headers: &headers,
            payload_sha256: EMPTY_SHA256,
        };
        assert_eq!(
            canonical_request(&r),
            "GET\n/\n\nhost:example.amazonaws.com\nx-amz-date:20150830T123600Z\n\nhost;x-amz-date\n\
             e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            signature(&creds, "us-east-1", "service", "20150830T123600Z", &r),
            "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"
        );
        // One character of the secret off: another signature.
        let wrong = Credentials {
            secret_access_key: "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEZ".into(),
            ..creds
        };
        assert_ne!(
            signature(&wrong, "us-east-1", "service", "20150830T123600Z", &r),
            "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"
        );
    }

    #[test]
    fn encoding() {
        assert_eq!(uri_encode("a b/c~d*é", true), "a%20b/c~d%2A%C3%A9");
        assert_eq!(uri_encode("a/b", false), "a%2Fb");
        assert_eq!(encode_path("weights", "m/x y.bin"), "/weights/m/x%20y.bin");
        assert_eq!(encode_path("", "m/x"), "/m/x");
        assert_eq!(encode_path("weights", ""), "/weights");
        assert_eq!(encode_path("", ""), "/");
        assert_eq!(
            canonical_query(&[
                ("prefix".into(), "m/".into()),
                ("list-type".into(), "2".into())
            ]),
            "list-type=2&prefix=m%2F"
        );
        assert_eq!(amz_date(1_369_353_600), "20130524T000000Z");
    }

    #[test]
    fn debug_hides_the_secret() {
        let d = format!("{:?}", s3_example());
        assert!(
            d.contains("AKIAIOSFODNN7EXAMPLE") && !d.contains("EXAMPLEKEY"),
            "{d}"
        );
    }
}
