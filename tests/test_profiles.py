"""Hardware profiles: shipped files, detection on this machine, matching, the CLI."""

import dataclasses
import os
import tomllib

import pytest

from deploykit.core.errors import ArtifactError
from deploykit.runtime.profiles import (
    CPU,
    GPU,
    Profile,
    detect_profile,
    known_profiles,
    load_profile,
    match_profile,
    profile_from_dict,
    to_toml,
)

SHIPPED = {"apple-m1-pro", "intel-i7-11800h", "epyc-7302p-rtx-2060-super", "nvidia-t4-cloud"}


def test_shipped_profiles_load_and_round_trip_through_toml():
    profiles = known_profiles()
    assert SHIPPED <= set(profiles)
    for profile in profiles.values():
        assert profile_from_dict(tomllib.loads(to_toml(profile)), "round trip") == profile
    m1 = profiles["apple-m1-pro"]
    assert (m1.cpu.cores, m1.memory.gb, m1.runtime.torch_device) == (10, 16, "mps")
    assert m1.default_threads() == 8  # performance cores only
    assert profiles["intel-i7-11800h"].default_threads() == 8  # physical cores, not the 16 threads
    epyc = profiles["epyc-7302p-rtx-2060-super"]
    assert epyc.gpu.memory_gb == 8 and "CUDAExecutionProvider" in epyc.runtime.onnxruntime_providers
    assert profiles["nvidia-t4-cloud"].cpu is None  # the study never named the host: nothing is made up


def test_detection_describes_this_machine():
    machine = detect_profile()
    assert machine.name.startswith("detected-")
    assert machine.cpu.threads == os.cpu_count()  # the OS's count, not the psutil call detection makes
    assert machine.runtime.onnxruntime_providers[-1] == "CPUExecutionProvider"
    assert "AzureExecutionProvider" not in machine.runtime.onnxruntime_providers  # remote, not a device here
    assert profile_from_dict(tomllib.loads(to_toml(machine)), "detected") == machine


def _machine(cpu: str, gpu: str | None = None) -> Profile:
    return Profile("detected-x", "x", cpu=CPU(model=cpu), gpu=GPU(model=gpu) if gpu else None)


@pytest.mark.parametrize("cpu, gpu, expected", [
    ("AMD EPYC 7302P 16-Core Processor", "NVIDIA GeForce RTX 2060 SUPER", "epyc-7302p-rtx-2060-super"),
    ("AMD EPYC 7302P 16-Core Processor", None, None),  # the profile is the host with its GPU
    ("Intel(R) Xeon(R) CPU @ 2.20GHz", "Tesla T4", "nvidia-t4-cloud"),
    ("11th Gen Intel(R) Core(TM) i7-11800H @ 2.30GHz", None, "intel-i7-11800h"),
    ("Apple M1 Pro", None, "apple-m1-pro"),
    ("Apple M1 Max", None, None),
])
def test_matching_names_the_known_profile(cpu, gpu, expected):
    found = match_profile(_machine(cpu, gpu))
    assert (found.name if found else None) == expected


def test_bad_profile_files_name_the_problem(tmp_path):
    good = to_toml(known_profiles()["intel-i7-11800h"])
    cases = {
        "typo.toml": (good.replace("cores = 8", "coers = 8"), r"\[cpu\]: unknown key 'coers'"),
        "negative.toml": (good.replace("cores = 8", "cores = -8"), "cores must be a positive integer"),
        "policy.toml": (good.replace('"physical-cores"', '"most"'), "unknown thread policy 'most'"),
        "syntax.toml": ("name = ", "cannot read profile"),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ArtifactError, match=message):
            load_profile(tmp_path / name)
    with pytest.raises(ArtifactError, match="does not exist"):
        load_profile(tmp_path / "absent.toml")


def test_cli_lists_shows_and_detects(cli, tmp_path):
    listed = cli("profile", "list")
    assert listed.returncode == 0 and all(name in listed.stdout for name in SHIPPED)
    shown = cli("profile", "show", "nvidia-t4-cloud")
    assert shown.returncode == 0 and tomllib.loads(shown.stdout)["gpu"]["memory_gb"] == 16
    missing = cli("profile", "show", "nope")
    assert missing.returncode == 2 and "unknown profile 'nope'; known: apple-m1-pro" in missing.stderr
    path = tmp_path / "here.toml"
    detected = cli("profile", "detect", "--save", str(path), "--json")
    assert detected.returncode == 0, detected.stderr
    saved = load_profile(path)
    assert saved.name.startswith("detected-") and dataclasses.asdict(saved)["cpu"]["threads"] == os.cpu_count()
