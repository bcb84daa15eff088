"""Fixtures shared by every test package."""

from __future__ import annotations

import json
import os
from datetime import datetime, timedelta
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VECTORS = ROOT.parent / "shared" / "vectors"


@pytest.fixture(scope="session")
def vectors_dir() -> Path:
    """../shared/vectors beside the project root; its absence is a loud failure, never a skip."""
    if not VECTORS.is_dir():
        pytest.fail(f"attestation vectors not found at {VECTORS} (expected ../shared/vectors)")
    return VECTORS


@pytest.fixture(scope="session")
def expected(vectors_dir: Path) -> dict:
    return json.loads((vectors_dir / "expected.json").read_text())


def parse_when(text: str) -> datetime:
    """expected.json times ("2023-04-03 19:23:43+00:00" or "2023-07-01T00:00:00Z") as aware datetimes."""
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def inside_validity(not_before: str) -> datetime:
    """A verification time inside a vector's certificate validity: not_before + 1 day."""
    return parse_when(not_before) + timedelta(days=1)


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """URL of the PostgreSQL that ./dev test starts; missing means a loud failure, not a skip."""
    url = os.environ.get("CUBE_TEST_POSTGRES_URL")
    if not url:
        pytest.fail("CUBE_TEST_POSTGRES_URL is not set: run the suite with ./dev test (it starts PostgreSQL)")
    return url
