#!/usr/bin/env python3
"""Validates rendered Kubernetes manifests offline and strictly.

Reads the multi-document YAML that `kubectl kustomize` prints on standard
input. Built-in kinds are checked with kubernetes-validate's strict schemas
for every --kubernetes-version given ("latest" is the newest it knows);
custom resources against the openAPIV3Schema of their CRD in --crd-dir, with
unknown fields refused wherever the schema does not allow them
(x-kubernetes-preserve-unknown-fields or additionalProperties). A kind that
neither knows is an error, not a warning.

On success it prints the objects as one JSON array, so that a test can assert
on exactly what was validated; otherwise every problem goes to standard error
and the exit status is 1.

Used by crates/server/tests/deploy_manifests.rs; needs kubernetes-validate
(PyPI, which brings jsonschema and PyYAML), installed by tests/run.
"""

import argparse
import glob
import json
import sys

import jsonschema
import kubernetes_validate
import yaml


def strict(schema):
    """The CRD schema with additionalProperties false wherever it lists
    properties and neither allows extra ones nor preserves unknown fields:
    the API server would prune such fields silently, which hides typos."""
    if isinstance(schema, dict):
        out = {key: strict(value) for key, value in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    return schema


def load_crds(crd_dir):
    """(apiVersion, kind) -> strict validator, for every served version."""
    validators = {}
    paths = sorted(glob.glob(f"{crd_dir}/*.yaml"))
    if not paths:
        raise SystemExit(f"no CRD schemas in {crd_dir}")
    for path in paths:
        with open(path, encoding="utf-8") as file:
            for crd in yaml.safe_load_all(file):
                if not crd or crd.get("kind") != "CustomResourceDefinition":
                    continue
                group = crd["spec"]["group"]
                kind = crd["spec"]["names"]["kind"]
                for version in crd["spec"]["versions"]:
                    if not version.get("served", False):
                        continue
                    schema = strict(version["schema"]["openAPIV3Schema"])
                    validators[(f"{group}/{version['name']}", kind)] = (
                        jsonschema.Draft7Validator(schema)
                    )
    return validators


def name_of(obj):
    metadata = obj.get("metadata") or {}
    return f"{obj.get('kind')}/{metadata.get('name')}"


def problems(obj, versions, crds):
    """Every reason `obj` is invalid, as lines of text."""
    if not isinstance(obj, dict) or "apiVersion" not in obj or "kind" not in obj:
        return [f"{obj!r:.80}: not a Kubernetes object"]
    validator = crds.get((obj["apiVersion"], obj["kind"]))
    if validator is not None:
        return [
            f"{name_of(obj)}: {'.'.join(map(str, error.path)) or '(root)'}: {error.message}"
            for error in sorted(validator.iter_errors(obj), key=str)
        ]
    found = []
    for version in versions:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            return [
                f"{name_of(obj)}: unknown kind {obj['apiVersion']} {obj['kind']} "
                f"(neither Kubernetes {version} nor a CRD in the schema directory)"
            ]
        except kubernetes_validate.ValidationError as error:
            path = ".".join(map(str, error.path)) or "(root)"
            found.append(
                f"{name_of(obj)} against Kubernetes {version}: {path}: {error.message}"
            )
    return found


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--crd-dir", required=True)
    parser.add_argument(
        "--kubernetes-version", action="append", required=True, dest="versions"
    )
    args = parser.parse_args()
    versions = [
        kubernetes_validate.latest_version() if v == "latest" else v
        for v in args.versions
    ]
    crds = load_crds(args.crd_dir)
    objects = [obj for obj in yaml.safe_load_all(sys.stdin) if obj is not None]
    if not objects:
        raise SystemExit("no objects on standard input")
    found = [line for obj in objects for line in problems(obj, versions, crds)]
    for line in found:
        print(line, file=sys.stderr)
    if found:
        return 1
    json.dump(objects, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
