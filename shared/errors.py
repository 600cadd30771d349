"""fedchat's own exception types. Every message says what is wrong and what to do."""


class FedchatError(Exception):
    """Base class: an error the user can act on (the CLI prints it without a traceback)."""


class ConfigError(FedchatError):
    """A configuration value is missing, malformed or out of range."""


class DataError(FedchatError):
    """A dialogue data file cannot be used as it is."""


class ModelError(FedchatError):
    """A base model or adapter cannot be found or loaded."""


class CheckpointError(FedchatError):
    """A checkpoint is missing, corrupt or belongs to a different run configuration."""


class PrivacyError(FedchatError):
    """A privacy setting cannot be honoured (budget, delta, accountant)."""


class LedgerError(FedchatError):
    """A privacy ledger cannot be written or does not verify."""


class FederationError(FedchatError):
    """The federation cannot proceed (too few nodes, failed secure aggregation)."""


class RosterError(ConfigError):
    """A federation roster, or a node's identity key, is missing, malformed or not the one approved."""


class MissingExtraError(FedchatError):
    """A command needs a package that only one of fedchat's extras installs (a node's install has none)."""


# Each extra of pyproject.toml's [project.optional-dependencies], by the modules it provides.
EXTRA_MODULES = {
    "serve": ("fastapi", "uvicorn"),
    "eval": ("rouge_score", "sacrebleu"),
    "tune": ("optuna",),
    "simulation": ("ray",),
}


def require_extra(extra: str, needed_for: str) -> None:
    """Raise MissingExtraError naming the extra to install if any module of `extra` is missing."""
    from importlib.util import find_spec

    missing = [m for m in EXTRA_MODULES[extra] if find_spec(m) is None]
    if missing:
        raise MissingExtraError(
            f"{needed_for} needs {', '.join(missing)}, which a node's install leaves out: install fedchat[{extra}] "
            f"(pip install -e '.[{extra}]' in your fedchat checkout; `make install` installs every extra).")
