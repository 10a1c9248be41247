//! The sample MoEDeployments parse as the API types and pass validation.

use moe_operator::api::validate::validate;
use moe_operator::api::MoEDeployment;

#[test]
fn demo_example_is_a_valid_moedeployment() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/demo.yaml");
    let text = std::fs::read_to_string(path).unwrap();
    let md: MoEDeployment = serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"));
    assert_eq!(md.metadata.name.as_deref(), Some("demo"));
    let errs = validate(&md.spec);
    assert!(errs.is_empty(), "{path}: {errs:?}");
    // The demo stays within what CEL checks too.
    let s = &md.spec;
    assert!(s.model.top_k <= s.model.experts && s.model.first_moe_layer < s.model.layers);
    assert!(s.rollout.max_unavailable <= s.topology.nodes);
}
