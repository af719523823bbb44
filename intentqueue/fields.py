"""Model fields of intentqueue."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models

UINT256_MAX = 2**256 - 1


class Uint256Field(models.Field):
    """An unsigned 256-bit integer, a Python ``int``, stored exactly.

    PostgreSQL stores it as ``NUMERIC(78, 0)``; other databases as a decimal string,
    because SQLite keeps NUMERIC values above 2**63 as 8-byte floats (15 digits).
    """

    description = "Unsigned 256-bit integer"
    default_validators = [MinValueValidator(0), MaxValueValidator(UINT256_MAX)]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("default", 0)
        super().__init__(*args, **kwargs)

    def db_type(self, connection: Any) -> str:
        return "numeric(78, 0)" if connection.vendor == "postgresql" else "varchar(78)"

    def get_prep_value(self, value: Any) -> int | None:
        value = super().get_prep_value(value)
        return None if value is None else self.to_python(value)

    def get_db_prep_value(self, value: Any, connection: Any, prepared: bool = False) -> Any:
        if not prepared:
            value = self.get_prep_value(value)
        if value is None:
            return None
        return Decimal(value) if connection.vendor == "postgresql" else str(value)

    def from_db_value(self, value: Any, expression: Any, connection: Any) -> int | None:
        return None if value is None else int(value)

    def to_python(self, value: Any) -> int | None:
        if value is None or (isinstance(value, int) and not isinstance(value, bool)):
            return value
        try:
            return int(str(value))
        except ValueError as error:
            raise ValidationError(f"{value!r} is not an integer") from error

    def formfield(self, **kwargs: Any) -> Any:
        from django import forms

        return super().formfield(
            **{"form_class": forms.IntegerField, "min_value": 0, "max_value": UINT256_MAX, **kwargs}
        )
