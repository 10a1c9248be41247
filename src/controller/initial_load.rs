//! `spec.initialLoad`: a load trace in a ConfigMap key that the first plan is made from, before the
//! workers report any load. Pure: the reconciler fetches the ConfigMap and passes it here.
//!
//! The key may hold any format `plan::load_formats` reads (our trace, JSON Lines, SGLang's
//! expert-distribution dump, the OLMoE/Mixtral routing counts), in `data` or `binaryData`.

use k8s_openapi::api::core::v1::ConfigMap;

use crate::plan::load_formats::{parse_load_bytes_with, LoadLimits};
use crate::plan::{LoadWindow, ModelShape};

/// Why the initial load could not be used; the message names the ConfigMap, the key and the fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("spec.initialLoad: {0}")]
pub struct InitialLoadError(pub String);

/// The load window of the trace in `key` of the ConfigMap `namespace/name` (`cm` is `None` when
/// it does not exist), checked against `model`.
pub fn initial_load_window(
    namespace: &str,
    name: &str,
    key: &str,
    cm: Option<&ConfigMap>,
    model: &ModelShape,
) -> Result<LoadWindow, InitialLoadError> {
    let what = format!("ConfigMap {namespace}/{name} key {key:?}");
    let Some(cm) = cm else {
        return Err(InitialLoadError(format!(
            "ConfigMap {namespace}/{name} does not exist: create it with the load trace under key \
             {key:?} (kubectl -n {namespace} create configmap {name} --from-file={key}=TRACE), or \
             remove spec.initialLoad"
        )));
    };
    let bytes: Vec<u8> = if let Some(s) = cm.data.as_ref().and_then(|d| d.get(key)) {
        s.as_bytes().to_vec()
    } else if let Some(b) = cm.binary_data.as_ref().and_then(|d| d.get(key)) {
        b.0.clone()
    } else {
        let mut keys: Vec<&str> = cm
            .data
            .iter()
            .flat_map(|d| d.keys())
            .chain(cm.binary_data.iter().flat_map(|d| d.keys()))
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        return Err(InitialLoadError(format!(
            "ConfigMap {namespace}/{name} has no key {key:?} (its keys: {}): fix \
             spec.initialLoad.key or add the trace under that key",
            if keys.is_empty() {
                "none".to_string()
            } else {
                keys.join(", ")
            }
        )));
    };
    // LoadError names the position and the problem; prefix it with the ConfigMap and key. The
    // operator's limits: one namespace's ConfigMap must not take the operator's memory.
    let w = parse_load_bytes_with(&what, &bytes, &LoadLimits::operator())
        .map_err(|e| InitialLoadError(e.to_string()))?;
    w.check_against(model)
        .map_err(|p| InitialLoadError(format!("{what}: {p}")))?;
    if w.total_tokens() <= 0.0 {
        return Err(InitialLoadError(format!(
            "{what}: the trace counts no tokens, so it cannot inform a plan: give a trace with load"
        )));
    }
    Ok(w)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::load_formats::{to_trace_json, to_trace_jsonl};
    use k8s_openapi::ByteString;
    use std::collections::BTreeMap;

    fn model() -> ModelShape {
        serde_json::from_value::<crate::api::ModelSpec>(serde_json::json!({
            "layers": 3, "firstMoeLayer": 1, "experts": 4, "topK": 2, "hiddenSize": 64,
            "expertIntermediateSize": 32, "checkpoint": {"path": "/m"}
        }))
        .unwrap()
        .shape()
        .unwrap()
    }

    fn cm(key: &str, value: &str) -> ConfigMap {
        ConfigMap {
            data: Some(BTreeMap::from([(key.to_string(), value.to_string())])),
            ..Default::default()
        }
    }

    fn read(c: Option<&ConfigMap>) -> Result<LoadWindow, InitialLoadError> {
        initial_load_window("ml", "traces", "load.json", c, &model())
    }

    #[test]
    fn a_trace_claiming_a_huge_shape_is_an_error_not_an_abort() {
        // Issue 19: 1e12 experts aborted the operator (allocation failure) on every restart.
        let t = r#"{"format":"moe-load-trace/v1","experts":1000000000000,"layers":[1,2],"batches":[{"tokens":[[1,2],[3,4]]}]}"#;
        let e = read(Some(&cm("load.json", t))).unwrap_err().to_string();
        assert!(e.contains("more than the limit of 1024"), "{e}");
        // Within the per-expert limit but past the operator's cell budget (9 batches of the
        // largest model: 4.7M counts against 4.2M), refused before the counts are read.
        let many = format!(
            r#"{{"format":"moe-load-trace/v1","experts":1024,"layers":[{}],"batches":[{}]}}"#,
            (0..512)
                .map(|l| l.to_string())
                .collect::<Vec<_>>()
                .join(","),
            [r#"{"tokens":[[1]]}"#; 9].join(",")
        );
        let e = read(Some(&cm("load.json", &many))).unwrap_err().to_string();
        assert!(e.contains("the limit for this reader"), "{e}");
    }

    #[test]
    fn reads_every_format_from_data_and_binary_data() {
        let w =
            LoadWindow::new(vec![1, 2], 4, vec![9.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 9.0]).unwrap();
        // SGLang's dump has a row per model layer; the dense layer 0 is all zeros.
        let sglang = r#"{"logical_count": [[0, 0, 0, 0], [9, 1, 1, 1], [1, 1, 1, 9]]}"#;
        for text in [to_trace_json(&w, None), to_trace_jsonl(&w, None)] {
            let got = read(Some(&cm("load.json", &text))).unwrap();
            assert_eq!(got.totals(), w.totals());
        }
        let got = read(Some(&cm("load.json", sglang))).unwrap();
        assert_eq!(got.total_tokens(), 24.0);
        let bin = ConfigMap {
            binary_data: Some(BTreeMap::from([(
                "load.json".to_string(),
                ByteString(sglang.as_bytes().to_vec()),
            )])),
            ..Default::default()
        };
        assert_eq!(read(Some(&bin)).unwrap().total_tokens(), 24.0);
    }

    #[test]
    fn missing_or_garbled_traces_name_the_config_map_key_and_problem() {
        let e = read(None).unwrap_err().to_string();
        assert!(
            e.contains("ConfigMap ml/traces does not exist") && e.contains("--from-file=load.json"),
            "{e}"
        );
        let e = read(Some(&cm("other", "{}"))).unwrap_err().to_string();
        assert!(
            e.contains("has no key \"load.json\" (its keys: other)"),
            "{e}"
        );
        let e = read(Some(&cm("load.json", "{\"logical_count\": [[1, 2,"))).unwrap_err();
        assert!(
            e.0.starts_with("ConfigMap ml/traces key \"load.json\": line 1"),
            "{e}"
        );
        // Another model's load: 8 experts where the model has 4.
        let e = read(Some(&cm(
            "load.json",
            &format!("{{\"logical_count\": [{:?}]}}", [1; 8]),
        )))
        .unwrap_err()
        .to_string();
        assert!(e.contains("8 experts per layer but the model has 4"), "{e}");
        let e = read(Some(&cm(
            "load.json",
            "{\"logical_count\": [[0, 0, 0, 0]]}",
        )))
        .unwrap_err()
        .to_string();
        assert!(e.contains("key \"load.json\""), "{e}");
    }
}
