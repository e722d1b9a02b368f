//! Cluster suite for the Weir API (runs when `KUBECONFIG` names a cluster;
//! skips otherwise): the API server accepts every generated CRD, accepts
//! every example (server-side dry run), and rejects every invalid example
//! with a message naming the offending field.

use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use weir_e2e::{cluster_client, repo_root, yaml_docs, yaml_files};

fn api_for(client: &kube::Client, doc: &serde_json::Value) -> Api<DynamicObject> {
    let kind = doc["kind"].as_str().expect("kind");
    let gvk = GroupVersionKind::gvk(weir_crds::GROUP, weir_crds::VERSION, kind);
    let resource = ApiResource::from_gvk(&gvk);
    match doc["metadata"]["namespace"].as_str() {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &resource),
        None => Api::all_with(client.clone(), &resource),
    }
}

async fn install_crds(client: &kube::Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let params = PatchParams::apply("weir-e2e").force();
    for crd in weir_crds::all() {
        let name = crd.metadata.name.clone().unwrap();
        crds.patch(&name, &params, &Patch::Apply(&crd))
            .await
            .unwrap_or_else(|e| panic!("API server refused CRD {name}: {e}"));
    }
    for crd in weir_crds::all() {
        let name = crd.metadata.name.clone().unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let current = crds.get(&name).await.expect("CRD readable");
            let established = current
                .status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True");
            if established {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "CRD {name} never became Established"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

#[tokio::test]
async fn api_server_accepts_crds_and_examples_and_rejects_invalid_ones() {
    let Some(client) = cluster_client().await else {
        return;
    };
    install_crds(&client).await;
    let dry_run = PostParams {
        dry_run: true,
        ..PostParams::default()
    };

    for file in yaml_files(&repo_root().join("charts/weir/examples")) {
        for doc in yaml_docs(&file) {
            let object: DynamicObject = serde_json::from_value(doc.clone()).expect("object");
            api_for(&client, &doc)
                .create(&dry_run, &object)
                .await
                .unwrap_or_else(|e| {
                    panic!("{}: API server rejected an example: {e}", file.display())
                });
        }
    }

    for file in yaml_files(&repo_root().join("docs/examples/invalid")) {
        let text = std::fs::read_to_string(&file).unwrap();
        let field = text
            .lines()
            .find_map(|l| l.strip_prefix("# expect-field: "))
            .expect("expect-field");
        let doc = yaml_docs(&file).remove(0);
        let object: DynamicObject = serde_json::from_value(doc.clone()).expect("object");
        match api_for(&client, &doc).create(&dry_run, &object).await {
            Ok(_) => panic!("{}: API server accepted an invalid object", file.display()),
            Err(kube::Error::Api(status)) => {
                assert_eq!(status.code, 422, "{}: {status:?}", file.display());
                assert!(
                    status.message.contains(field),
                    "{}: message does not name {field}: {}",
                    file.display(),
                    status.message
                );
            }
            Err(other) => panic!("{}: {other}", file.display()),
        }
    }
}
