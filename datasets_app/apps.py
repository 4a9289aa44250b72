from django.apps import AppConfig
from django.db.models.signals import post_migrate


def _seed_after_migrate(sender, using: str = "default", **kwargs) -> None:
    # Registered like Django's own contenttypes/permissions: after every migrate
    # (and test flush) the bundled datasets exist. Idempotent.
    from .seeding import seed_datasets

    if using == "default":
        seed_datasets()


class DatasetsAppConfig(AppConfig):
    name = "datasets_app"
    verbose_name = "Datasets"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        post_migrate.connect(_seed_after_migrate, sender=self, dispatch_uid="datasets_app.seed")
