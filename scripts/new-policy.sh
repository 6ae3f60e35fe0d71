#!/usr/bin/env bash
# Creates policies/NAME from templates/policy and adds it to the workspace.
#   usage: scripts/new-policy.sh NAME      (NAME: lower case, digits and hyphens)
set -euo pipefail
cd "$(dirname "$0")/.."
name=${1:?usage: scripts/new-policy.sh NAME}
[[ $name =~ ^[a-z][a-z0-9-]*$ ]] || { echo "error: NAME must be lower case letters, digits and hyphens, like my-policy" >&2; exit 1; }
[ -e "policies/$name" ] && { echo "error: policies/$name exists" >&2; exit 1; }
cp -r templates/policy "policies/$name"
sed -i "s/NAME/$name/g" "policies/$name/Cargo.toml" "policies/$name/src/lib.rs"
sed -i "s|^members = \[|members = [\n    \"policies/$name\",|" Cargo.toml
echo "created policies/$name; build it with scripts/build-policy.sh $name"
