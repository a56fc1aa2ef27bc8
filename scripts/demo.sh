#!/usr/bin/env bash
# The main job on its embedded default:
#  1. QEMU-emulated Xen (no Xen needed on this machine): Xen 4.17, dom0 with xenstored, xl and our
#     `vtpm serve`, and a PV guest whose stock Linux xen-tpmfront uses our vTPM with tpm2-tools;
#  2. Debian's tpm2-tools using our vTPM through swtpm's socket protocol (`vtpm socket`);
#  3. container vTPMs: a Debian VM under QEMU where `xvtpm container` makes /dev/tpmN through
#     Linux's vTPM proxy (/dev/vtpmx) and tpm2-tools use them.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
./scripts/deps.sh
cargo build --release --locked -q -p xvtpm-vtpm -p xvtpm-tests -p xvtpm-tools --bins
bin=./target/release

echo "=== 1. A Xen guest using our vTPM: Xen 4.17 + dom0 + a PV guest under QEMU (TCG), from Debian packages"
echo "    dom0 runs xenstored, xl and our 'vtpm serve'; the guest's stock xen-tpmfront gives tpm2-tools /dev/tpm0"
img=target/xen-demo
bash tests/harness/build-xen.sh "$img" "$bin" > "$img.build.log" 2>&1 || { cat "$img.build.log"; exit 1; }
if bash tests/harness/boot-xen.sh "$img" "$img/boot.log" 1200; then result=PASS; else result=FAIL; fi
grep -E "XVTPM-|  xl:|^  \[20" "$img/boot.log" | tr -d '\r'
echo "Xen end-to-end: $result (serial log: $img/boot.log)"
echo "    (without QEMU: ./target/release/xvtpm-sim-demo runs guests on the simulated Xen)"
echo
echo "=== 2. tpm2-tools against vtpm socket (swtpm protocol, TCTI swtpm)"
work=$(mktemp -d)
trap 'kill $vtpm_pid 2>/dev/null || true; rm -rf "$work"' EXIT
port=$((20000 + RANDOM % 20000))
head -c 32 /dev/urandom > "$work/key"
"$bin/vtpm" create --state-dir "$work/state" --key "$work/key"
"$bin/vtpm" socket --tpm2 --server type=tcp,port=$port --ctrl type=tcp,port=$((port + 1)) \
    --tpmstate dir="$work/state" --key file="$work/key",format=binary,mode=aes-256-cbc \
    --flags not-need-init,startup-clear 2>"$work/vtpm.log" &
vtpm_pid=$!
for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.05; done
export TPM2TOOLS_TCTI="swtpm:host=127.0.0.1,port=$port"
cd "$work"
set -x
tpm2_getrandom --hex 16; echo
tpm2_pcrextend 16:sha256=$(printf 'xvtpm' | sha256sum | cut -d' ' -f1)
tpm2_pcrread sha256:16
tpm2_createprimary -C o -G ecc -c primary.ctx -Q
tpm2_flushcontext -t   # no resource manager on a raw TPM: free transient slots
tpm2_pcrread -Q sha256:16 -o pcr.bin
tpm2_createpolicy -Q --policy-pcr -l sha256:16 -f pcr.bin -L pcr.policy
echo "a secret sealed to PCR 16" > secret
tpm2_create -Q -C primary.ctx -L pcr.policy -i secret -u seal.pub -r seal.priv
tpm2_flushcontext -t
tpm2_load -Q -C primary.ctx -u seal.pub -r seal.priv -c seal.ctx
tpm2_unseal -c seal.ctx -p pcr:sha256:16
tpm2_flushcontext -t
tpm2_pcrextend 16:sha256=$(printf 'changed' | sha256sum | cut -d' ' -f1)
tpm2_unseal -c seal.ctx -p pcr:sha256:16 2>/dev/null || echo "unseal refused after PCR 16 changed, as it must be"
set +x
echo "(vTPM state in $work/state: $(ls "$work/state" | tr '\n' ' '))"
echo
echo "=== 3. Container vTPMs: a Debian VM under QEMU (TCG) with the tpm_vtpm_proxy module"
echo "    'xvtpm container create|stop|start|destroy' run 'vtpm proxy'; tpm2-tools use /dev/tpmrmN"
cd "$root"
img="$root/target/proxy-demo"
bash tests/harness/build-proxy-vm.sh "$img" "$bin" > "$img.build.log" 2>&1 || { cat "$img.build.log"; exit 1; }
timeout 600 qemu-system-x86_64 -machine q35 -accel tcg -cpu qemu64 -m 512 -smp 1 -display none -monitor none \
    -serial stdio -no-reboot -kernel "$img/vmlinuz" -initrd "$img/initrd.gz" \
    -append "console=ttyS0 panic=-1 loglevel=4" < /dev/null > "$img.console.log" 2>&1 || true
grep "XVTPM-VM:" "$img.console.log" | tr -d '\r' | cut -c1-200
grep -q "XVTPM-VM: DONE" "$img.console.log" && echo "Container vTPMs: done (console: $img.console.log)" \
    || { echo "Container vTPMs: the VM did not finish (console: $img.console.log)"; exit 1; }
