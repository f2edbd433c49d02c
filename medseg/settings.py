"""Object-store connection settings, from the environment only.

The names are the ones KServe, the AWS CLI and MinIO SDK users already know:
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``S3_ENDPOINT`` (or ``AWS_ENDPOINT_URL``),
``S3_USE_HTTPS`` and ``AWS_REGION``. For local use, ``medseg minio`` writes them to an env file
(``.medseg/minio.env``, or the path in ``MEDSEG_ENV_FILE``) that is read as a fallback; real
environment variables always win. Secrets are :class:`pydantic.SecretStr` so they never print.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

#: Default env file written by ``medseg minio`` and read by every other command.
DEFAULT_ENV_FILE = Path(".medseg") / "minio.env"


def env_file_path() -> Path:
    """Where the local env file is (``MEDSEG_ENV_FILE`` overrides the default)."""
    return Path(os.environ.get("MEDSEG_ENV_FILE", str(DEFAULT_ENV_FILE)))


class StorageSettings(BaseSettings):
    """How to reach the S3-compatible object store.

    Attributes:
        access_key: ``AWS_ACCESS_KEY_ID``.
        secret_key: ``AWS_SECRET_ACCESS_KEY``.
        endpoint: ``S3_ENDPOINT`` or ``AWS_ENDPOINT_URL``; ``host:port`` or a URL.
        use_https: ``S3_USE_HTTPS`` ("0"/"1"); defaults to the URL scheme, else HTTPS.
        region: ``AWS_REGION`` or ``AWS_DEFAULT_REGION``.
        retry_seconds: How long an operation keeps retrying connection errors.
        part_size: Multipart part size in bytes for uploads.
    """

    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True)

    access_key: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("AWS_ACCESS_KEY_ID", "access_key")
    )
    secret_key: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("AWS_SECRET_ACCESS_KEY", "secret_key")
    )
    endpoint: str | None = Field(
        default=None, validation_alias=AliasChoices("S3_ENDPOINT", "AWS_ENDPOINT_URL", "endpoint")
    )
    use_https: bool | None = Field(
        default=None, validation_alias=AliasChoices("S3_USE_HTTPS", "use_https")
    )
    region: str | None = Field(
        default=None, validation_alias=AliasChoices("AWS_REGION", "AWS_DEFAULT_REGION", "region")
    )
    retry_seconds: float = Field(
        default=30.0,
        ge=0,
        validation_alias=AliasChoices("MEDSEG_S3_RETRY_SECONDS", "retry_seconds"),
    )
    part_size: int = Field(
        default=16 * 1024 * 1024,
        ge=5 * 1024 * 1024,
        validation_alias=AliasChoices("MEDSEG_S3_PART_SIZE", "part_size"),
    )

    @classmethod
    def from_env(cls) -> StorageSettings:
        """Read the environment, falling back to the local env file when it exists."""
        path = env_file_path()
        if path.is_file():
            return cls(_env_file=path)  # type: ignore[call-arg]
        return cls()

    def host_and_secure(self) -> tuple[str, bool]:
        """Split the endpoint into ``host:port`` and whether to use TLS.

        Raises:
            ValueError: If no endpoint is configured.
        """
        if not self.endpoint:
            raise ValueError(
                "no S3 endpoint configured: set S3_ENDPOINT (or AWS_ENDPOINT_URL), "
                "or start a local server with `medseg minio`"
            )
        if "://" in self.endpoint:
            parsed = urlparse(self.endpoint)
            secure = parsed.scheme == "https" if self.use_https is None else self.use_https
            return parsed.netloc, secure
        return self.endpoint, True if self.use_https is None else self.use_https

    def display_endpoint(self) -> str:
        """The endpoint as it may appear in messages (never a credential)."""
        try:
            host, secure = self.host_and_secure()
        except ValueError:
            return "<no endpoint>"
        return f"{'https' if secure else 'http'}://{host}"


class DeidSettings(BaseSettings):
    """The de-identification secret (see :mod:`medseg.deid`), from the environment only.

    Attributes:
        key: ``MEDSEG_DEID_KEY``: UIDs, pseudonyms and date shifts derive from it. Keep it in a
            Secret; whoever holds it can link de-identified studies to their sources.
    """

    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True)

    key: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("MEDSEG_DEID_KEY", "key")
    )
