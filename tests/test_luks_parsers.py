"""Pure tests of the LUKS2 parsers and cryptsetup argument lists, from recorded cryptsetup 2.6 outputs (and a live image)."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from crashcart.errors import InvalidInput, LuksError
from integrations import luks

FIXTURES = Path(__file__).parent / "fixtures" / "luks"
FAST = luks.pbkdf_arguments("pbkdf2-fast")


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


def exit_code_of(name: str) -> tuple[str, int]:
    """A recorded output whose last line is `exit N` (how record-2.6.sh keeps the exit code)."""
    text = fixture(name)
    body, _, last = text.rstrip("\n").rpartition("\n")
    assert last.startswith("exit ")
    return body, int(last.split()[1])


# -- luksDump --dump-json-metadata ---------------------------------------------------------------
def test_the_labs_layout_two_pbkdf2_slots():
    header = luks.parse_luks2_metadata(fixture("dump-two-slots-pbkdf2.json"))
    assert header.active == (0, 1)
    assert [k.kdf for k in header.keyslots] == ["pbkdf2", "pbkdf2"]
    assert all(k.priority == "normal" and k.unlocks_volume for k in header.keyslots)
    assert header.tokens == ()
    assert header.free_slot(avoid=(1,)) == 2


def test_after_a_rotation_the_new_argon2id_slot_and_the_freed_slot():
    header = luks.parse_luks2_metadata(fixture("dump-rotated-argon2id.json"))
    assert header.active == (1, 2)
    assert header.slot(2).kdf == "argon2id"
    assert header.slot(0) is None
    assert header.free_slot(avoid=(1,)) == 0  # the wiped slot is reused first


def test_a_token_bound_slot_is_named_with_its_token_type():
    header = luks.parse_luks2_metadata(fixture("dump-token-bound.json"))
    assert header.active == (0, 1)
    assert header.token_types(1) == ("systemd-tpm2",)
    assert header.token_types(0) == ()
    assert header.as_dict()["tokens"] == [{"id": 0, "type": "systemd-tpm2", "keyslots": [1]}]


def test_evidence_form_carries_no_salt_or_digest():
    text = json.dumps(luks.parse_luks2_metadata(fixture("dump-two-slots-pbkdf2.json")).as_dict())
    raw = json.loads(fixture("dump-two-slots-pbkdf2.json"))
    for secretish in [raw["digests"]["0"]["digest"], raw["digests"]["0"]["salt"], raw["keyslots"]["0"]["kdf"]["salt"]]:
        assert secretish not in text


def test_a_slot_outside_every_segment_digest_does_not_open_the_volume():
    data = json.loads(fixture("dump-two-slots-pbkdf2.json"))
    data["digests"]["0"]["keyslots"] = ["0"]  # slot 1 left unbound, as `luksAddKey --unbound` leaves it
    header = luks.parse_luks2_metadata(json.dumps(data))
    assert header.active == (0,)
    assert header.free_slot() == 2  # an unbound slot is still in use


def test_priorities_map_to_words():
    data = json.loads(fixture("dump-two-slots-pbkdf2.json"))
    data["keyslots"]["0"]["priority"] = 0
    data["keyslots"]["1"]["priority"] = 2
    header = luks.parse_luks2_metadata(json.dumps(data))
    assert [k.priority for k in header.keyslots] == ["ignore", "prefer"]


def test_every_slot_taken_leaves_no_free_slot():
    data = json.loads(fixture("dump-two-slots-pbkdf2.json"))
    template = data["keyslots"]["0"]
    data["keyslots"] = {str(n): copy.deepcopy(template) for n in range(luks.MAX_KEYSLOTS)}
    assert luks.parse_luks2_metadata(json.dumps(data)).free_slot() is None


@pytest.mark.parametrize("text", ["", "not json", "[]", '{"keyslots": {}}', '{"digests": {}}'])
def test_output_that_is_not_luks2_metadata_is_refused(text):
    with pytest.raises(LuksError, match="LUKS2"):
        luks.parse_luks2_metadata(text)


@pytest.mark.parametrize("mutate", [
    lambda d: d["keyslots"].update({"32": d["keyslots"]["0"]}),
    lambda d: d["keyslots"].update({"x": d["keyslots"]["0"]}),
    lambda d: d["keyslots"].update({"3": "not an object"}),
    lambda d: d["digests"]["0"].update({"keyslots": ["one"]}),
])
def test_malformed_keyslots_are_refused(mutate):
    data = json.loads(fixture("dump-two-slots-pbkdf2.json"))
    mutate(data)
    with pytest.raises(LuksError):
        luks.parse_luks2_metadata(json.dumps(data))


# -- test-passphrase and failures ----------------------------------------------------------------
def test_the_unlocked_slot_is_read_from_verbose_output():
    body, code = exit_code_of("test-passphrase-ok.stdout")
    assert code == 0
    assert luks.parse_unlocked_slot(body) == 2


def test_a_refused_passphrase_names_no_slot_and_exits_2():
    body, code = exit_code_of("test-passphrase-refused.stdout")
    assert code == luks.EXIT_REFUSED
    assert luks.parse_unlocked_slot(body) is None
    assert "no keyslot accepts" in luks.failure_reason("/x.img", code, fixture("test-passphrase-refused.stderr"))


def test_luks1_and_non_luks_devices_are_named():
    stderr, code = exit_code_of("dump-luks1.stderr")
    assert "not LUKS2" in luks.failure_reason("/srv/a.img", code, stderr)
    stderr, code = exit_code_of("dump-not-luks.stderr")
    assert luks.failure_reason("/srv/b.img", code, stderr) == "/srv/b.img is not a LUKS device"
    assert "does not exist" in luks.failure_reason("/srv/c.img", luks.EXIT_NO_DEVICE, "")


# -- argument lists ------------------------------------------------------------------------------
def test_commands_carry_paths_and_slots_never_a_passphrase():
    assert luks.dump_command("/srv/luks/ephi.img") == ["cryptsetup", "luksDump", "--dump-json-metadata", "/srv/luks/ephi.img"]
    assert luks.test_passphrase_command("/srv/x.img", 3)[-3:] == ["--key-slot", "3", "/srv/x.img"]
    assert "--key-file=-" in luks.test_passphrase_command("/srv/x.img")
    assert luks.add_key_command("/srv/x.img", 2, "/run/d/current", "pbkdf2-fast") == [
        "cryptsetup", "luksAddKey", *FAST, "--key-file", "/run/d/current", "--key-slot", "2", "/srv/x.img", "-"]
    assert "--pbkdf" not in luks.add_key_command("/srv/x.img", 2, "/run/d/current")  # production: argon2id default
    assert luks.kill_slot_command("/srv/x.img", 0) == ["cryptsetup", "luksKillSlot", "--key-file=-", "/srv/x.img", "0"]


@pytest.mark.parametrize("device", ["/dev/sda;rm", "relative.img", "/srv/../etc/shadow", "/dev/sda $(id)", "-v"])
def test_hostile_device_paths_are_refused(device):
    with pytest.raises(InvalidInput):
        luks.dump_command(device)


@pytest.mark.parametrize("slot", [-1, 32, True, "1"])
def test_slot_numbers_outside_luks2_are_refused(slot):
    with pytest.raises(LuksError):
        luks.kill_slot_command("/srv/x.img", slot)


def test_unknown_pbkdf_is_refused():
    with pytest.raises(LuksError):
        luks.pbkdf_arguments("scrypt")


# -- the same against the real cryptsetup on a throwaway image -----------------------------------
@pytest.mark.skipif(shutil.which("cryptsetup") is None, reason="cryptsetup is not installed")
def test_the_argument_lists_work_against_real_cryptsetup(tmp_path):
    """Format, add, prove, kill with exactly the argument lists the flow sends; parse what cryptsetup prints."""
    image, current = tmp_path / "disk.img", tmp_path / "current"
    subprocess.run(["truncate", "-s", "32M", str(image)], check=True)
    current.write_text("fixture-current")
    current.chmod(0o600)

    def run(argv, stdin=b""):
        return subprocess.run(argv, input=stdin, capture_output=True)

    assert run(["cryptsetup", "luksFormat", "--batch-mode", "--type", "luks2", *FAST, "--key-slot", "0",
                "--key-file", str(current), str(image)]).returncode == 0
    header = luks.parse_luks2_metadata(run(luks.dump_command(str(image))).stdout.decode())
    assert header.active == (0,)
    slot = header.free_slot()
    assert run(luks.add_key_command(str(image), slot, str(current), "pbkdf2-fast"), b"fixture-new").returncode == 0
    proof = run(luks.test_passphrase_command(str(image), slot), b"fixture-new")
    assert proof.returncode == 0 and luks.parse_unlocked_slot(proof.stdout.decode()) == slot
    assert run(luks.kill_slot_command(str(image), 0), b"fixture-new").returncode == 0
    refused = run(luks.test_passphrase_command(str(image)), b"fixture-current")
    assert refused.returncode == luks.EXIT_REFUSED
    assert luks.parse_luks2_metadata(run(luks.dump_command(str(image))).stdout.decode()).active == (slot,)
