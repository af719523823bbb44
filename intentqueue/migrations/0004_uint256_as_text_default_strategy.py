# Uint256Field became a decimal string outside PostgreSQL (SQLite rounded NUMERIC values
# above 2**63 to floats). Its declared type changed without its deconstruction changing,
# so each amount column is altered to text and back, which makes SQLite rebuild the table
# with the new column type; on PostgreSQL the round trip ends where it started.

import intentqueue.fields
import intentqueue.models
from django.db import migrations, models

AMOUNTS = ("route_native_amount", "reward_native_amount")


class Migration(migrations.Migration):
    dependencies = [
        ("intentqueue", "0003_chain_execution"),
    ]

    operations = [
        migrations.AlterField(
            model_name="intent",
            name="strategy",
            field=models.CharField(default=intentqueue.models.default_strategy, max_length=64),
        ),
        *(
            migrations.AlterField(
                model_name="intent", name=name, field=models.TextField(default="0")
            )
            for name in AMOUNTS
        ),
        *(
            migrations.AlterField(
                model_name="intent", name=name, field=intentqueue.fields.Uint256Field(default=0)
            )
            for name in AMOUNTS
        ),
        *(
            migrations.AlterField(
                model_name="chaintransaction",
                name=name,
                field=intentqueue.fields.Uint256Field(default=0),
            )
            for name in ("value", "max_fee_per_gas", "max_priority_fee_per_gas")
        ),
    ]
