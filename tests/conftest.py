"""Root conftest: pytest's default import mode puts this folder on sys.path, so tests can
``from small_models import small_model``."""
