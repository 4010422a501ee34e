//! `deploy/`: every kustomize overlay renders offline and passes a strict
//! validation (built-in kinds against Kubernetes 1.29 and the newest schemas
//! kubernetes-validate knows, custom resources against their CRDs in
//! `../shared/k8s-crd-schemas`), and the honey overlay keeps the facts its
//! operators rely on, so that an edit cannot drift from them silently.
//!
//! Needs `kubectl` (for `kubectl kustomize`) and `python3` with
//! kubernetes-validate, which `tests/run` installs; no cluster.

use std::collections::BTreeSet;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use garret_server::config::{Config, Storage};
use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

/// Runs `program` with `stdin`, returning its standard output, or its
/// standard error when it fails.
fn run(program: &str, args: &[&str], stdin: &[u8]) -> Result<Vec<u8>, String> {
    let mut child = Command::new(program)
        .args(args)
        .current_dir(repo())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{program} is required (see tests/run): {e}"));
    // Written from a thread: a child that answers before reading all of its
    // input must not deadlock on a full pipe.
    let mut input = child.stdin.take().unwrap();
    let stdin = stdin.to_vec();
    let writer = std::thread::spawn(move || input.write_all(&stdin));
    let out = child.wait_with_output().unwrap();
    // A validator that refuses early closes its input: not our failure.
    let _ = writer.join().unwrap();
    if out.status.success() {
        Ok(out.stdout)
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// The CRD schemas custom resources are checked against: the shared ones
/// beside the checkout (`../shared/k8s-crd-schemas`, also looked for beside
/// each parent, for clones made elsewhere), `GARRET_CRD_SCHEMAS` first if
/// set, and the workspace's `/work/shared` last. Never copied into the repo.
fn crd_schemas() -> PathBuf {
    let repo = repo();
    let candidates = std::env::var_os("GARRET_CRD_SCHEMAS")
        .map(PathBuf::from)
        .into_iter()
        .chain(
            repo.ancestors()
                .map(|dir| dir.join("shared/k8s-crd-schemas")),
        )
        .chain([PathBuf::from("/work/shared/k8s-crd-schemas")]);
    let mut tried = Vec::new();
    for dir in candidates {
        if dir.join("postgresql.cnpg.io_clusters.yaml").is_file() {
            return dir;
        }
        tried.push(dir.display().to_string());
    }
    panic!(
        "no CRD schemas (../shared/k8s-crd-schemas); set GARRET_CRD_SCHEMAS. Tried: {}",
        tried.join(", ")
    )
}

/// `deploy/validate.py` over a YAML stream: the objects it validated, or
/// every problem it found.
fn validate(yaml: &[u8]) -> Result<Vec<Value>, String> {
    let crds = crd_schemas();
    let out = run(
        "python3",
        &[
            "deploy/validate.py",
            "--crd-dir",
            crds.to_str().unwrap(),
            "--kubernetes-version",
            "1.29.0",
            "--kubernetes-version",
            "latest",
        ],
        yaml,
    )?;
    Ok(serde_json::from_slice(&out).unwrap())
}

/// An overlay as `kubectl kustomize` renders it, validated.
fn render(overlay: &Path) -> Vec<Value> {
    let yaml = run("kubectl", &["kustomize", overlay.to_str().unwrap()], b"")
        .unwrap_or_else(|e| panic!("kubectl kustomize {}: {e}", overlay.display()));
    validate(&yaml).unwrap_or_else(|e| panic!("{} does not validate:\n{e}", overlay.display()))
}

/// Every overlay, rendered and validated once for all the tests here.
fn overlays() -> &'static [(String, Vec<Value>)] {
    static OVERLAYS: OnceLock<Vec<(String, Vec<Value>)>> = OnceLock::new();
    OVERLAYS.get_or_init(|| {
        let mut dirs: Vec<PathBuf> = std::fs::read_dir(repo().join("deploy/kustomize/overlays"))
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .collect();
        dirs.sort();
        dirs.iter()
            .map(|dir| {
                let name = dir.file_name().unwrap().to_str().unwrap().to_owned();
                (name, render(dir))
            })
            .collect()
    })
}

fn overlay(name: &str) -> &'static [Value] {
    overlays()
        .iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("no overlay {name}"))
        .1
        .as_slice()
}

fn honey() -> &'static [Value] {
    overlay("honey")
}

fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

/// Where a workload keeps its pod spec, if it is one.
fn pod_path(object: &Value) -> Option<&'static str> {
    match object["kind"].as_str()? {
        "Deployment" | "Job" => Some("/spec/template/spec"),
        "CronJob" => Some("/spec/jobTemplate/spec/template/spec"),
        _ => None,
    }
}

fn pod_spec(object: &Value) -> Option<&Value> {
    object.pointer(pod_path(object)?)
}

fn containers(pod: &Value) -> impl Iterator<Item = &Value> {
    ["initContainers", "containers"]
        .into_iter()
        .filter_map(|list| pod[list].as_array())
        .flatten()
}

fn node_of(object: &Value) -> &str {
    pod_spec(object)
        .and_then(|pod| pod["nodeSelector"]["kubernetes.io/hostname"].as_str())
        .unwrap_or_else(|| panic!("{} has no node selector", object["metadata"]["name"]))
}

#[test]
fn every_overlay_renders_and_validates() {
    let names: Vec<&str> = overlays().iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(names, ["honey", "honey-config-secret", "honey-import"]);
    for (name, objects) in overlays() {
        assert!(objects.len() > 20, "{name}: {} objects", objects.len());
        for object in objects {
            let (kind, metadata) = (&object["kind"], &object["metadata"]);
            let expected = if kind == "Namespace" || kind == "StorageClass" {
                Value::Null
            } else {
                Value::from("nix-cache")
            };
            assert_eq!(
                metadata["namespace"], expected,
                "{name}: {kind} {}",
                metadata["name"]
            );
        }
    }
}

/// The validator is what makes the test above able to fail: each of these
/// documents differs from a valid one by one defect, and each is refused
/// with a message that names it.
#[test]
fn the_validator_refuses_unknown_kinds_fields_and_values() {
    let cases = [
        (
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\ndata: {k: v}\ndatta: {}\n",
            "'datta' was unexpected",
        ),
        (
            "apiVersion: example.org/v1\nkind: Frobnicator\nmetadata: {name: a}\n",
            "unknown kind example.org/v1 Frobnicator",
        ),
        (
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: a}\nspec:\n  selector: {matchLabels: {a: b}}\n  template:\n    metadata: {labels: {a: b}}\n    spec: {containers: [{name: c, image: i, imagePullPolice: Always}]}\n",
            "'imagePullPolice' was unexpected",
        ),
        (
            "apiVersion: postgresql.cnpg.io/v1\nkind: Cluster\nmetadata: {name: a}\nspec: {instances: 2, storage: {size: 1Gi, storageClas: x}}\n",
            "'storageClas' was unexpected",
        ),
        (
            "apiVersion: postgresql.cnpg.io/v1\nkind: Pooler\nmetadata: {name: a}\nspec: {cluster: {name: b}, pgbouncer: {poolMode: statement}}\n",
            "'statement' is not one of",
        ),
        (
            "apiVersion: monitoring.coreos.com/v1\nkind: PrometheusRule\nmetadata: {name: a}\nspec: {groups: [{name: g, rules: [{alert: A, expr: up, fore: 5m}]}]}\n",
            "'fore' was unexpected",
        ),
    ];
    for (yaml, expected) in cases {
        let refusal = validate(yaml.as_bytes()).expect_err(yaml);
        assert!(
            refusal.contains(expected),
            "{yaml}\nrefused with:\n{refusal}"
        );
    }
    let fixed = cases[0].0.replace("datta: {}\n", "");
    assert_eq!(validate(fixed.as_bytes()).unwrap().len(), 1);
}

#[test]
fn honey_keeps_names_and_nodes() {
    let objects = honey();
    let namespace = find(objects, "Namespace", "nix-cache");
    assert_eq!(
        namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"],
        "restricted"
    );
    let rustfs = find(objects, "Deployment", "attic-rustfs-openebs");
    assert_eq!(rustfs["spec"]["strategy"]["type"], "Recreate");
    assert_eq!(rustfs["spec"]["replicas"], 1);
    assert_eq!(node_of(rustfs), "bumble");
    let labels = &rustfs["spec"]["template"]["metadata"]["labels"];
    for name in ["attic-rustfs", "attic-rustfs-hl"] {
        let selector = find(objects, "Service", name)["spec"]["selector"]
            .as_object()
            .unwrap();
        assert!(!selector.is_empty());
        for (key, value) in selector {
            assert_eq!(
                &labels[key], value,
                "Service {name} selects the RustFS pods"
            );
        }
    }
    assert_eq!(node_of(find(objects, "Deployment", "garret")), "sting");
    assert_eq!(node_of(find(objects, "CronJob", "garret-gc")), "sting");
    let db = find(objects, "Cluster", "garret-db");
    assert_eq!(db["spec"]["instances"], 2);
    assert_eq!(
        db["spec"]["affinity"]["nodeSelector"]["kubernetes.io/hostname"],
        "bumble"
    );
    for storage in ["storage", "walStorage"] {
        assert_eq!(db["spec"][storage]["storageClass"], "openebs-zfspv");
    }
    let claim = find(objects, "PersistentVolumeClaim", "attic-rustfs-data");
    assert_eq!(claim["spec"]["storageClassName"], "openebs-zfspv");
}

#[test]
fn every_overlay_pins_every_image() {
    for (name, objects) in overlays() {
        let mut images: Vec<&str> = objects
            .iter()
            .filter_map(pod_spec)
            .flat_map(containers)
            .map(|c| c["image"].as_str().unwrap())
            .collect();
        for object in objects {
            for pointer in ["/spec/imageName", "/spec/pgbouncer/image"] {
                images.extend(object.pointer(pointer).and_then(Value::as_str));
            }
        }
        assert!(images.len() >= 6, "{name}: {images:?}");
        for image in images {
            assert!(
                pinned(image),
                "{name}: {image} is neither a digest nor an exact version"
            );
        }
    }
}

/// `name@sha256:<64 hex>`, or a tag that names one release: digits with
/// dots, optionally a pre-release suffix (`1.0.0-alpha.66`, `17.6`), or a
/// dated release (`RELEASE.2025-04-16T18-13-26Z`).
fn pinned(image: &str) -> bool {
    if let Some((_, digest)) = image.split_once("@sha256:") {
        return digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_hexdigit());
    }
    let Some((_, tag)) = image.rsplit_once(':').filter(|(name, _)| !name.is_empty()) else {
        return false;
    };
    let version = tag.strip_prefix("RELEASE.").unwrap_or(tag);
    let (numbers, _) = version.split_once(['-', 'T']).unwrap_or((version, ""));
    let parts: Vec<&str> = numbers.split('.').collect();
    (parts.len() >= 2 || tag.starts_with("RELEASE."))
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
}

/// Each layer holds what deploy/README.md applies in that step, so applying
/// by layer label keeps the order storage, database, objects, garret, and
/// the hosts move from Attic only with the last.
#[test]
fn honey_objects_belong_to_their_layer() {
    let layer_of = |kind: &str, name: &str| {
        find(honey(), kind, name)["metadata"]["labels"]["garret.deploy/layer"].clone()
    };
    for (kind, name, layer) in [
        ("Namespace", "nix-cache", "foundation"),
        ("StorageClass", "openebs-zfspv", "foundation"),
        ("NetworkPolicy", "default-deny", "foundation"),
        ("NetworkPolicy", "attic-seed-stack", "foundation"),
        ("NetworkPolicy", "attic-seed-stack-rustfs", "foundation"),
        ("Cluster", "garret-db", "database"),
        ("Pooler", "garret-db-pooler-rw", "database"),
        ("ScheduledBackup", "garret-db-daily", "database"),
        ("PersistentVolumeClaim", "attic-rustfs-data", "objects"),
        ("Deployment", "attic-rustfs-openebs", "objects"),
        ("Job", "rustfs-bucket-bootstrap", "objects"),
        ("Deployment", "garret", "cache"),
        ("CronJob", "garret-gc", "cache"),
        ("Ingress", "garret", "ingress"),
        ("Ingress", "garret-grpc", "ingress"),
    ] {
        assert_eq!(layer_of(kind, name), layer, "{kind} {name}");
    }
    let layers: BTreeSet<&str> = honey()
        .iter()
        .map(|o| {
            o["metadata"]["labels"]["garret.deploy/layer"]
                .as_str()
                .unwrap()
        })
        .collect();
    assert_eq!(
        layers,
        BTreeSet::from(["cache", "database", "foundation", "ingress", "objects"])
    );
}

/// The policies that keep Attic's stack open while it runs beside garret
/// select none of garret's pods, whose traffic stays limited to what their
/// own policies allow.
#[test]
fn honey_seed_stack_policies_leave_garrets_pods_alone() {
    let seed = &find(honey(), "NetworkPolicy", "attic-seed-stack")["spec"]["podSelector"];
    let rustfs = &find(honey(), "NetworkPolicy", "attic-seed-stack-rustfs")["spec"];
    assert_eq!(&rustfs["ingress"][0]["from"][0]["podSelector"], seed);
    let selects = |labels: &Value| {
        seed["matchExpressions"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| {
                assert_eq!(e["operator"], "NotIn");
                let value = &labels[e["key"].as_str().unwrap()];
                !e["values"].as_array().unwrap().contains(value)
            })
    };
    let mut ours = 0;
    for object in honey() {
        if let Some(path) = pod_path(object) {
            let template = path.trim_end_matches("/spec");
            let labels = &object.pointer(template).unwrap()["metadata"]["labels"];
            assert!(!selects(labels), "{}", object["metadata"]["name"]);
            ours += 1;
        }
    }
    assert_eq!(ours, 4, "garret, RustFS, the bucket Job and GC");
    for labels in [
        serde_json::json!({"cnpg.io/cluster": "garret-db"}),
        serde_json::json!({"cnpg.io/poolerName": "garret-db-pooler-rw"}),
    ] {
        assert!(!selects(&labels), "{labels}");
    }
    assert!(selects(
        &serde_json::json!({"app.kubernetes.io/name": "attic"})
    ));
    assert!(selects(&serde_json::json!({"cnpg.io/cluster": "attic-db"})));
}

#[test]
fn pinned_refuses_floating_tags() {
    for good in [
        "ghcr.io/cloudnative-pg/postgresql:17.6",
        "rustfs/rustfs:1.0.0-alpha.66",
        "minio/mc:RELEASE.2025-04-16T18-13-26Z",
        "registry:5000/garret:0.1.0",
        "garret@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
    ] {
        assert!(pinned(good), "{good}");
    }
    for bad in [
        "garret",
        "garret:latest",
        "postgres:17",
        "rustfs/rustfs:stable",
        "registry:5000/garret",
        "garret@sha256:abc",
    ] {
        assert!(!pinned(bad), "{bad}");
    }
}

#[test]
fn honey_jobs_are_kept_and_gc_never_overlaps() {
    for object in honey() {
        let job = match object["kind"].as_str().unwrap() {
            "Job" => &object["spec"],
            "CronJob" => &object["spec"]["jobTemplate"]["spec"],
            _ => continue,
        };
        assert_eq!(
            job["ttlSecondsAfterFinished"],
            Value::Null,
            "{} must be retained after completion",
            object["metadata"]["name"]
        );
        assert!(job["backoffLimit"].is_u64());
        assert!(job["activeDeadlineSeconds"].is_u64());
    }
    let gc = &find(honey(), "CronJob", "garret-gc")["spec"];
    assert_eq!(gc["concurrencyPolicy"], "Forbid");
    assert!(gc["startingDeadlineSeconds"].is_u64());
    assert!(gc["successfulJobsHistoryLimit"].is_u64());
    assert!(gc["failedJobsHistoryLimit"].is_u64());
    let command = &gc["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["args"];
    assert_eq!(command[0], "gc");
}

#[test]
fn honey_storage_class_retains_zfs_on_bumble() {
    let class = find(honey(), "StorageClass", "openebs-zfspv");
    assert_eq!(class["provisioner"], "zfs.csi.openebs.io");
    assert_eq!(class["reclaimPolicy"], "Retain");
    assert_eq!(class["volumeBindingMode"], "WaitForFirstConsumer");
    assert_eq!(class["parameters"]["fstype"], "zfs");
    assert_eq!(class["parameters"]["compression"], "off");
    assert!(class["parameters"]["poolname"].is_string());
    assert_eq!(
        class["allowedTopologies"][0]["matchLabelExpressions"][0]["values"],
        serde_json::json!(["bumble"])
    );
}

/// Secrets are only referenced, by the names and data keys that exist on
/// honey today (and the one CNPG generates): a renamed key would start pods
/// that cannot find it.
#[test]
fn every_overlay_references_secrets_by_name_and_key_only() {
    let known = |pairs: &[(&str, &str)]| -> BTreeSet<(String, String)> {
        pairs
            .iter()
            .map(|(name, key)| ((*name).to_owned(), (*key).to_owned()))
            .collect()
    };
    let honey_refs = known(&[
        ("attic-config", "garret.toml"),
        (
            "attic-jwt-signing",
            "ATTIC_SERVER_TOKEN_HS256_SECRET_BASE64",
        ),
        ("attic-rustfs-credentials", "RUSTFS_ACCESS_KEY"),
        ("attic-rustfs-credentials", "RUSTFS_SECRET_KEY"),
        ("garret-db-app", "password"),
    ]);
    let mut moved = honey_refs.clone();
    moved.remove(&("attic-config".to_owned(), "garret.toml".to_owned()));
    moved.extend(known(&[("attic-server-config", "garret.toml")]));
    let mut adopting = honey_refs.clone();
    adopting.extend(known(&[("attic-secrets", "ATTIC_SERVER_DATABASE_URL")]));
    let expected = [
        ("honey", honey_refs),
        ("honey-config-secret", moved),
        ("honey-import", adopting),
    ];
    for (name, refs) in expected {
        let objects = overlay(name);
        assert!(objects.iter().all(|o| o["kind"] != "Secret"), "{name}");
        let mut found = BTreeSet::new();
        collect_secret_refs(&serde_json::json!(objects), &mut found);
        assert_eq!(found, refs, "{name}");
    }
}

/// Every (Secret or ConfigMap, key) pair below `value`: `secretKeyRef`,
/// CNPG's `{name, key}` credentials, and volumes' `items`.
fn collect_secret_refs(value: &Value, refs: &mut BTreeSet<(String, String)>) {
    match value {
        Value::Object(map) => {
            if let (Some(Value::String(name)), Some(Value::String(key))) =
                (map.get("name"), map.get("key"))
            {
                refs.insert((name.clone(), key.clone()));
            }
            // A Secret volume names its source `secretName`, a ConfigMap
            // volume `name`.
            let source = map.get("secretName").or_else(|| map.get("name"));
            if let (Some(Value::String(name)), Some(Value::Array(items))) =
                (source, map.get("items"))
            {
                for item in items {
                    refs.insert((name.clone(), item["key"].as_str().unwrap().to_owned()));
                }
            }
            map.values().for_each(|v| collect_secret_refs(v, refs));
        }
        Value::Array(items) => items.iter().for_each(|v| collect_secret_refs(v, refs)),
        _ => {}
    }
}

/// Restricted Pod Security for every pod the overlay creates, and the API's
/// rollout and probes.
#[test]
fn honey_pods_are_restricted_and_the_api_rolls_without_loss() {
    for object in honey() {
        let Some(pod) = pod_spec(object) else {
            continue;
        };
        let name = &object["metadata"]["name"];
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{name}");
        assert_eq!(
            pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault",
            "{name}"
        );
        for container in containers(pod) {
            let security = &container["securityContext"];
            assert_eq!(security["allowPrivilegeEscalation"], false, "{name}");
            assert_eq!(security["readOnlyRootFilesystem"], true, "{name}");
            assert_eq!(security["capabilities"]["drop"], serde_json::json!(["ALL"]));
            assert!(
                container["resources"]["limits"]["memory"].is_string(),
                "{name}"
            );
        }
    }
    let api = &find(honey(), "Deployment", "garret")["spec"];
    assert!(api["replicas"].as_u64().unwrap() >= 2);
    assert_eq!(api["strategy"]["rollingUpdate"]["maxUnavailable"], 0);
    let pod = &api["template"]["spec"];
    assert_eq!(
        pod["initContainers"][0]["args"],
        serde_json::json!(["migrate"])
    );
    let serve = &pod["containers"][0];
    assert_eq!(serve["args"], serde_json::json!(["serve"]));
    assert_eq!(serve["startupProbe"]["grpc"]["port"], 8080);
    assert_eq!(serve["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(serve["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert!(
        find(honey(), "HorizontalPodAutoscaler", "garret")["spec"]["minReplicas"].as_u64()
            >= Some(2)
    );
}

/// garret itself accepts the configuration the honey pods start with: the
/// shipped garret.toml under the variables of the `garret-env` ConfigMap,
/// with stand-ins for what comes from Secrets; and the pods' grace period
/// outlasts the upload drain that file asks for.
#[test]
fn honey_configuration_is_one_garret_accepts() {
    let env = honey()
        .iter()
        .find(|o| {
            o["kind"] == "ConfigMap"
                && o["metadata"]["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with("garret-env-"))
        })
        .expect("the garret-env ConfigMap")["data"]
        .clone();
    let file = repo().join("deploy/kustomize/overlays/honey/garret.toml");
    let config = Config::load(Some(&file), |name| {
        env[name]
            .as_str()
            .map(str::to_owned)
            .or_else(|| (name == "GARRET_TOKEN_HS256_SECRET_BASE64").then(|| "c2VjcmV0".to_owned()))
    })
    .unwrap();
    config.validate().unwrap();
    assert_eq!(config.listen.port(), 8080);
    assert!(config.listen.ip().is_unspecified());
    assert_eq!(
        config.database_url(),
        "postgres://garret@garret-db-pooler-rw:5432/garret"
    );
    let Storage::S3(s3) = &config.storage else {
        panic!("storage: {:?}", config.storage);
    };
    assert_eq!(s3.endpoint.as_deref(), Some("http://attic-rustfs:9000"));
    assert_eq!(
        config.gc.interval_secs, 0,
        "the CronJob collects, serve does not"
    );
    let grace = find(honey(), "Deployment", "garret")["spec"]["template"]["spec"]
        ["terminationGracePeriodSeconds"]
        .as_u64()
        .unwrap();
    assert!(grace > config.connections.shutdown_timeout_secs);
}

/// The `secret` configuration mode changes where garret.toml comes from and
/// nothing else.
#[test]
fn config_secret_overlay_only_moves_the_config_source() {
    let moved = overlay("honey-config-secret");
    let from_secret = serde_json::json!({
        "name": "config",
        "secret": {
            "secretName": "attic-server-config",
            "items": [{"key": "garret.toml", "path": "garret.toml"}],
        },
    });
    let mut expected = honey().to_vec();
    let mut switched = 0;
    for object in &mut expected {
        let Some(path) = pod_path(object) else {
            continue;
        };
        let volumes = object.pointer_mut(&format!("{path}/volumes"));
        for volume in volumes.and_then(Value::as_array_mut).into_iter().flatten() {
            if volume["name"] == "config" {
                *volume = from_secret.clone();
                switched += 1;
            }
        }
    }
    assert_eq!(switched, 2, "the API's and GC's config volumes");
    assert_eq!(moved, expected.as_slice());
}

fn nix_instantiate(args: &[&str]) -> Vec<u8> {
    run("nix-instantiate", args, b"").unwrap_or_else(|e| panic!("nix-instantiate {args:?}: {e}"))
}

#[test]
fn flake_and_nix_files_parse() {
    for file in [
        "flake.nix",
        "deploy/nix/package.nix",
        "deploy/nix/module.nix",
    ] {
        nix_instantiate(&["--parse", file]);
    }
}

/// The NixOS module evaluated against the stand-ins of
/// `tests/fixtures/nixos-module-stub.nix` (nixpkgs cannot be fetched here):
/// settings reach the config file, secrets come from the environment file,
/// serve runs hardened and outlasts its drain on stop, gc runs on a timer,
/// and a disabled module configures nothing.
#[test]
fn nixos_module_evaluates_against_a_stub() {
    let out = nix_instantiate(&[
        "--eval",
        "--strict",
        "--json",
        "crates/server/tests/fixtures/nixos-module-stub.nix",
    ]);
    let module: Value = serde_json::from_slice(&out).unwrap();
    let options = &module["options"]["services"]["garret"];
    for option in ["enable", "package", "settings", "environmentFile"] {
        assert!(options[option]["description"].is_string(), "{option}");
    }
    assert!(options["gc"]["schedule"]["default"].is_string());
    let units = &module["config"]["systemd"];
    let serve = &units["services"]["garret"];
    let store = "/nix/store/00000000000000000000000000000000-garret-0.1.0";
    assert_eq!(
        serve["serviceConfig"]["ExecStart"],
        format!("{store}/bin/garret serve")
    );
    assert_eq!(
        serve["environment"]["GARRET_CONFIG"],
        r#"garret.toml:{"connections":{"shutdown_timeout_secs":600},"listen":"[::]:8080"}"#
    );
    assert_eq!(
        serve["serviceConfig"]["EnvironmentFile"],
        serde_json::json!(["/run/secrets/garret.env"])
    );
    assert_eq!(serve["serviceConfig"]["User"], "garret");
    assert_eq!(serve["serviceConfig"]["NoNewPrivileges"], true);
    assert_eq!(serve["serviceConfig"]["ProtectSystem"], "strict");
    assert!(serve["serviceConfig"]["TimeoutStopSec"].as_u64() > Some(600));
    let gc = &units["services"]["garret-gc"]["serviceConfig"];
    assert_eq!(gc["ExecStart"], format!("{store}/bin/garret gc --json"));
    assert_eq!(gc["Type"], "oneshot");
    assert_eq!(
        units["timers"]["garret-gc"]["timerConfig"]["OnCalendar"],
        "*-*-* 00/6:17:00"
    );
    assert_eq!(module["disabled"], serde_json::json!({}));
}
