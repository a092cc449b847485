//! The Istio objects the docs and the end-to-end tests apply are valid
//! against Istio's upstream CRD schemas (`../shared/apis/istio/`, beside the
//! repository), so "Istio's YAML works unchanged" is about Istio's YAML, not
//! a look-alike. A small structural-schema check: types, properties
//! (unknown ones are errors, as `kubectl apply --validate=strict` makes
//! them), enums, `maxItems`, `additionalProperties`, `items`.

use std::path::{Path, PathBuf};

use serde::Deserialize as _;
use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn yaml_docs(text: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|d| serde_yaml::Value::deserialize(d).expect("YAML"))
        .filter(|v| !v.is_null())
        .map(|v| serde_json::to_value(v).expect("JSON-compatible YAML"))
        .collect()
}

/// `(kind, version) -> openAPIV3Schema` of Istio's security and networking CRDs.
fn istio_schema(kind: &str) -> Value {
    let path = root().join("../shared/apis/istio/customresourcedefinitions.gen.yaml");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e} (Istio's CRDs, beside the repository)", path.display()));
    let crd = yaml_docs(&text)
        .into_iter()
        .find(|d| matches!(d["spec"]["group"].as_str(), Some("security.istio.io" | "networking.istio.io")) && d["spec"]["names"]["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} CRD"));
    let v1 = crd["spec"]["versions"].as_array().unwrap().iter().find(|v| v["name"] == "v1").expect("v1").clone();
    v1["schema"]["openAPIV3Schema"].clone()
}

fn check(v: &Value, s: &Value, at: &str, errors: &mut Vec<String>) {
    if s.get("x-kubernetes-int-or-string").is_some() || s.get("anyOf").is_some() {
        return;
    }
    let ty = s.get("type").and_then(Value::as_str);
    let ok = match ty {
        Some("object") => v.is_object(),
        Some("array") => v.is_array(),
        Some("string") => v.is_string(),
        Some("integer") => v.is_i64() || v.is_u64(),
        Some("boolean") => v.is_boolean(),
        _ => true,
    };
    if !ok {
        return errors.push(format!("{at}: expected {}, got {v}", ty.unwrap_or("?")));
    }
    if let Some(allowed) = s.get("enum").and_then(Value::as_array)
        && !allowed.contains(v)
    {
        errors.push(format!("{at}: {v} is not one of {allowed:?}"));
    }
    if let (Some(items), Some(a)) = (s.get("items"), v.as_array()) {
        if let Some(max) = s.get("maxItems").and_then(Value::as_u64)
            && a.len() as u64 > max
        {
            errors.push(format!("{at}: more than {max} items"));
        }
        for (i, x) in a.iter().enumerate() {
            check(x, items, &format!("{at}[{i}]"), errors);
        }
    }
    if let Some(o) = v.as_object() {
        let join = |k: &str| if at.is_empty() { k.to_owned() } else { format!("{at}.{k}") };
        let props = s.get("properties").and_then(Value::as_object);
        let extra = s.get("additionalProperties");
        let preserve = s.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
        for (k, x) in o {
            match (props.and_then(|p| p.get(k)), extra) {
                (Some(ps), _) => check(x, ps, &join(k), errors),
                (None, Some(e)) if e.is_object() => check(x, e, &join(k), errors),
                _ if preserve || at.is_empty() && matches!(k.as_str(), "apiVersion" | "kind" | "metadata") => {}
                _ => errors.push(format!("{}: unknown field", join(k))),
            }
        }
    }
}

fn errors(obj: &Value) -> Vec<String> {
    let kind = obj["kind"].as_str().expect("a kind");
    let mut errors = Vec::new();
    check(obj, &istio_schema(kind), "", &mut errors);
    errors
}

/// The documents of `text` that are Istio security or networking objects.
fn istio_objects(text: &str) -> Vec<Value> {
    if !text.contains("apiVersion: security.istio.io/") && !text.contains("apiVersion: networking.istio.io/") {
        return Vec::new(); // not YAML of ours (e.g. a test's Python app)
    }
    let istio = |a: &str| a.starts_with("security.istio.io/") || a.starts_with("networking.istio.io/");
    yaml_docs(text).into_iter().filter(|d| d["apiVersion"].as_str().is_some_and(istio)).collect()
}

#[test]
fn the_checker_refuses_what_istio_refuses() {
    let ok = serde_json::json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy", "metadata": {"name": "x"},
                                "spec": {"action": "DENY", "rules": [{"to": [{"operation": {"ports": ["80"]}}]}]}});
    assert_eq!(errors(&ok), Vec::<String>::new());
    for (bad, why) in [
        (serde_json::json!({"action": "REJECT"}), "spec.action"),
        (serde_json::json!({"rules": [{"to": [{"ports": ["80"]}]}]}), "spec.rules[0].to[0].ports: unknown field"),
        (serde_json::json!({"rules": [{"to": [{"operation": {"ports": [80]}}]}]}), "spec.rules[0].to[0].operation.ports[0]: expected string"),
    ] {
        let mut obj = ok.clone();
        obj["spec"] = bad;
        let e = errors(&obj);
        assert!(e.iter().any(|e| e.starts_with(why)), "{why}: {e:?}");
    }
}

/// Every Istio object of docs/istio-security.md and of the end-to-end test
/// of Istio's examples.
#[test]
fn the_examples_we_apply_are_istio_objects() {
    let docs = std::fs::read_to_string(root().join("docs/istio-security.md")).unwrap();
    let mut objects = Vec::new();
    for block in docs.split("```yaml").skip(1) {
        let yaml = block.split("```").next().unwrap();
        objects.extend(istio_objects(yaml));
    }
    let e2e = std::fs::read_to_string(root().join("tests/tests/istio_authz.rs")).unwrap();
    for raw in e2e.split("r#\"").skip(1) {
        let yaml = raw.split("\"#").next().unwrap();
        objects.extend(istio_objects(yaml));
    }
    // Istio's traffic task files, applied unchanged by tests/tests/istio_traffic.rs.
    let tasks = root().join("tests/istio-tasks");
    let mut traffic = 0;
    for entry in std::fs::read_dir(&tasks).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let found = istio_objects(&std::fs::read_to_string(&path).unwrap());
            traffic += found.len();
            objects.extend(found);
        }
    }
    assert!(traffic >= 15, "found only {traffic} traffic objects in {}", tasks.display());
    assert!(objects.len() >= 21, "found only {} objects", objects.len());
    for obj in &objects {
        let e = errors(obj);
        assert!(e.is_empty(), "{}: {e:?}", obj["metadata"]["name"]);
        // And the mesh accepts each as written.
        let kind = super::find(obj["apiVersion"].as_str().unwrap(), obj["kind"].as_str().unwrap()).unwrap();
        let annotations = Default::default();
        // Istio's samples name no namespace (`kubectl apply -n`).
        let meta = super::Meta { name: obj["metadata"]["name"].as_str().unwrap(), namespace: obj["metadata"]["namespace"].as_str().unwrap_or("default"), annotations: &annotations, created: None };
        kind.convert(&meta, &obj["spec"]).unwrap_or_else(|e| panic!("{}: {e}", meta.name));
    }
}
