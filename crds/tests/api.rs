//! Checks of the generated API without a cluster: the checked-in CRD YAML
//! matches the Rust types; every example passes the CRD's OpenAPI schema and
//! CEL rules (as the API server would apply them, defaults included); every
//! invalid example is rejected with an error that names the offending field.
//!
//! A real kube-apiserver remains the final judge (see `e2e/`); these tests
//! stand in for it in CI, which has no cluster.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde_json::Value;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("crds/ has a parent")
        .to_path_buf()
}

/// The `openAPIV3Schema` of every CRD, keyed by kind.
fn schemas() -> BTreeMap<String, Value> {
    weir_crds::all()
        .into_iter()
        .map(|crd: CustomResourceDefinition| {
            let kind = crd.spec.names.kind.clone();
            let schema = crd.spec.versions[0]
                .schema
                .as_ref()
                .and_then(|s| s.open_api_v3_schema.as_ref())
                .expect("every version has a schema");
            (
                kind,
                serde_json::to_value(schema).expect("schema serializes"),
            )
        })
        .collect()
}

/// Makes every object schema under `spec` reject unknown fields, as
/// `kubectl apply --validate=strict` does.
fn strict(schema: &mut Value) {
    if let Some(obj) = schema.as_object_mut() {
        if obj.contains_key("properties")
            && !obj.contains_key("x-kubernetes-preserve-unknown-fields")
        {
            obj.insert("additionalProperties".into(), Value::Bool(false));
        }
        for value in obj.values_mut() {
            strict(value);
        }
    } else if let Some(items) = schema.as_array_mut() {
        items.iter_mut().for_each(strict);
    }
}

/// Field paths (dotted, `spec.a.b[0]`) of every error the API server's
/// validation would report for `doc`: OpenAPI schema first, then CEL rules
/// on the defaulted object, as the API server orders them.
fn rejections(schemas: &BTreeMap<String, Value>, doc: &Value) -> Vec<String> {
    let kind = doc["kind"].as_str().expect("example has a kind");
    let schema = schemas
        .get(kind)
        .unwrap_or_else(|| panic!("no CRD for kind {kind}"));
    let mut spec_schema = schema["properties"]["spec"].clone();
    strict(&mut spec_schema);
    let validator = jsonschema::validator_for(&spec_schema).expect("spec schema compiles");
    let schema_errors: Vec<String> = validator
        .iter_errors(&doc["spec"])
        .map(|e| format!("spec{}: {e}", dotted(&e.instance_path.to_string())))
        .collect();
    if !schema_errors.is_empty() {
        return schema_errors;
    }
    match kube_cel::Validator::new().validate(schema, doc, None) {
        Ok(()) => Vec::new(),
        Err(errors) => errors
            .iter()
            .map(|e| format!("{}: {}", e.field_path, e.message))
            .collect(),
    }
}

/// `/a/b/0` → `.a.b[0]`.
fn dotted(pointer: &str) -> String {
    pointer
        .split('/')
        .filter(|s| !s.is_empty())
        .map(|s| {
            if s.chars().all(|c| c.is_ascii_digit()) {
                format!("[{s}]")
            } else {
                format!(".{s}")
            }
        })
        .collect()
}

fn yaml_docs(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| {
            let value: serde_yaml::Value = serde::Deserialize::deserialize(d).expect("valid YAML");
            serde_json::to_value(value).expect("YAML maps to JSON")
        })
        .filter(|v| !v.is_null())
        .collect()
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    files
}

#[test]
fn checked_in_crds_match_the_rust_types() {
    let root = repo_root();
    for crd in weir_crds::all() {
        let expected = weir_crds::render(&crd).expect("renders");
        for dir in ["crds", "charts/weir/crds"] {
            let path = root.join(dir).join(weir_crds::file_name(&crd));
            let actual = std::fs::read_to_string(&path).unwrap_or_default();
            assert!(
                actual == expected,
                "{} is out of date: run `cargo run -p weir-crds --bin crdgen`",
                path.display()
            );
        }
    }
}

#[test]
fn every_cel_rule_compiles_within_cost_budget() {
    for (kind, schema) in schemas() {
        let compiled = kube_cel::compile_schema(&schema);
        assert!(
            !compiled.has_errors(),
            "{kind}: {:?}",
            compiled.compilation_errors()
        );
    }
}

#[test]
fn every_kind_has_status_printer_columns_short_name_and_category() {
    for crd in weir_crds::all() {
        let names = &crd.spec.names;
        assert_eq!(crd.spec.group, "weir.dev");
        assert!(
            names.short_names.as_ref().is_some_and(|s| !s.is_empty()),
            "{}",
            names.kind
        );
        assert_eq!(
            names.categories.as_deref(),
            Some(&["weir".to_owned()][..]),
            "{}",
            names.kind
        );
        let version = &crd.spec.versions[0];
        assert_eq!(version.name, "v1alpha1");
        assert!(
            version
                .subresources
                .as_ref()
                .and_then(|s| s.status.as_ref())
                .is_some()
        );
        assert!(
            version
                .additional_printer_columns
                .as_ref()
                .is_some_and(|c| c.len() >= 3)
        );
        let schema = serde_json::to_value(version.schema.as_ref().unwrap()).unwrap();
        let status = &schema["openAPIV3Schema"]["properties"]["status"]["properties"];
        assert!(
            status["conditions"].is_object(),
            "{} status has conditions",
            names.kind
        );
        assert!(
            status["observedGeneration"].is_object(),
            "{} status has observedGeneration",
            names.kind
        );
    }
}

/// Every property below `spec` carries a description, which `kubectl explain`
/// shows.
#[test]
fn every_spec_field_is_described() {
    fn walk(path: &str, schema: &Value, missing: &mut Vec<String>) {
        if let Some(props) = schema.get("properties").and_then(Value::as_object) {
            for (name, prop) in props {
                let here = format!("{path}.{name}");
                if prop.get("description").is_none() {
                    missing.push(here.clone());
                }
                walk(&here, prop, missing);
            }
        }
        if let Some(items) = schema.get("items") {
            walk(&format!("{path}[]"), items, missing);
        }
    }
    let mut missing = Vec::new();
    for (kind, schema) in schemas() {
        walk(&kind, &schema["properties"]["spec"], &mut missing);
    }
    assert!(
        missing.is_empty(),
        "fields without a description: {missing:?}"
    );
}

#[test]
fn examples_are_accepted_and_parse_into_the_rust_types() {
    let schemas = schemas();
    let files = yaml_files(&repo_root().join("charts/weir/examples"));
    let mut kinds = std::collections::BTreeSet::new();
    for file in &files {
        for doc in yaml_docs(file) {
            let errors = rejections(&schemas, &doc);
            assert!(errors.is_empty(), "{}: {errors:?}", file.display());
            let kind = doc["kind"].as_str().unwrap().to_owned();
            let parsed = match kind.as_str() {
                "Model" => serde_json::from_value::<weir_crds::Model>(doc.clone()).map(|_| ()),
                "ModelEnsemble" => {
                    serde_json::from_value::<weir_crds::ModelEnsemble>(doc.clone()).map(|_| ())
                }
                "CachePolicy" => {
                    serde_json::from_value::<weir_crds::CachePolicy>(doc.clone()).map(|_| ())
                }
                "BatchPolicy" => {
                    serde_json::from_value::<weir_crds::BatchPolicy>(doc.clone()).map(|_| ())
                }
                "NodeAgent" => {
                    serde_json::from_value::<weir_crds::NodeAgent>(doc.clone()).map(|_| ())
                }
                "Tenant" => serde_json::from_value::<weir_crds::Tenant>(doc.clone()).map(|_| ()),
                other => panic!("unexpected kind {other}"),
            };
            parsed.unwrap_or_else(|e| panic!("{}: {kind}: {e}", file.display()));
            kinds.insert(kind);
        }
    }
    assert_eq!(kinds.len(), 6, "an example for every kind, found {kinds:?}");
}

#[test]
fn invalid_examples_are_rejected_naming_the_field() {
    let schemas = schemas();
    let files = yaml_files(&repo_root().join("docs/examples/invalid"));
    assert!(files.len() >= 4);
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let field = text
            .lines()
            .find_map(|l| l.strip_prefix("# expect-field: "))
            .unwrap_or_else(|| panic!("{}: no `# expect-field:` line", file.display()));
        let docs = yaml_docs(file);
        assert_eq!(docs.len(), 1, "{}", file.display());
        let errors = rejections(&schemas, &docs[0]);
        assert!(
            errors.iter().any(|e| e.starts_with(field)),
            "{}: expected an error at {field}, got {errors:?}",
            file.display()
        );
    }
}

#[test]
fn defaults_fill_an_empty_spec() {
    let policy: weir_crds::BatchPolicySpec = serde_json::from_str("{}").unwrap();
    assert_eq!(policy.max_num_seqs, 256);
    assert!(policy.circuit_breaker.enabled);
    let cache: weir_crds::CachePolicySpec = serde_json::from_str("{}").unwrap();
    assert_eq!(
        cache.response_cache.cacheable,
        weir_crds::cache_policy::Cacheability::DeterministicOnly
    );
    assert!(!cache.semantic_cache.enabled);
}
