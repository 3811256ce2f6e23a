#!/usr/bin/env bash
# CI: install what tests/test_slurm.py needs to bring up a real SLURM cluster on this machine (Debian's slurm-wlm +
# munge, plus iproute2 / util-linux for the network namespaces). Only as root and only if something is missing;
# never fails the CI run: without root or apt the SLURM test skips and says why.
set -uo pipefail
need=()
for b in slurmctld slurmd munged sbatch; do command -v "$b" >/dev/null 2>&1 || need+=(slurm-wlm munge); done
for b in ip; do command -v "$b" >/dev/null 2>&1 || need+=(iproute2); done
for b in unshare nsenter; do command -v "$b" >/dev/null 2>&1 || need+=(util-linux); done
if [ ${#need[@]} -eq 0 ]; then echo "slurm_setup: slurm-wlm, munge, iproute2, util-linux present"; exit 0; fi
if [ "$(id -u)" != 0 ]; then echo "slurm_setup: not root, skipping install (the SLURM test will skip)"; exit 0; fi
if ! command -v apt-get >/dev/null 2>&1; then echo "slurm_setup: no apt-get, skipping (the SLURM test will skip)"; exit 0; fi
pkgs=$(printf '%s\n' "${need[@]}" | sort -u | tr '\n' ' ')
echo "slurm_setup: installing $pkgs"
t0=$(date +%s)
if apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $pkgs >/dev/null; then
  echo "slurm_setup: installed in $(( $(date +%s) - t0 )) s"
else
  echo "slurm_setup: apt-get failed (the SLURM test will skip)"
fi
exit 0
