"""Run events move to a table partitioned by time: by the creation time of their run, copied
onto each event as `run_created_at`, so a run's events all live in one partition and (run, seq)
stays unique. One partition per UTC week (from Monday), created ahead by the worker
(runs.retention); a partition for everything before this migration, and a default one that
catches an event whose week has no partition yet (the worker then leaves that week to it)."""

from datetime import UTC, datetime, timedelta

from django.db import migrations, models

WEEKS_AHEAD = 2


def _week_partitions(start, weeks):
    for offset in range(weeks):
        week = start + timedelta(weeks=offset)
        yield (
            f"runs_runevent_p{week:%Y%m%d}",
            week.isoformat(),
            (week + timedelta(weeks=1)).isoformat(),
        )


def partition(apps, schema_editor):
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    monday = today - timedelta(days=today.weekday())
    run = schema_editor.execute
    run("ALTER TABLE runs_runevent RENAME TO runs_runevent_unpartitioned")
    run("ALTER TABLE runs_runevent_unpartitioned RENAME CONSTRAINT event_run_seq TO event_run_seq_unpartitioned")
    run("ALTER INDEX runs_runevent_pkey RENAME TO runs_runevent_unpartitioned_pkey")
    run(
        """
        CREATE TABLE runs_runevent (
            id varchar(64) COLLATE "C" NOT NULL,
            run_id varchar(64) COLLATE "C" NOT NULL,
            seq bigint NOT NULL,
            type varchar(32) NOT NULL,
            payload jsonb NOT NULL,
            created_at timestamptz NOT NULL,
            run_created_at timestamptz NOT NULL,
            CONSTRAINT runs_runevent_pkey PRIMARY KEY (id, run_created_at),
            CONSTRAINT event_run_seq UNIQUE (run_id, seq, run_created_at),
            CONSTRAINT runs_runevent_run_id_fk_runs_run_id FOREIGN KEY (run_id) REFERENCES runs_run (id)
                DEFERRABLE INITIALLY DEFERRED
        ) PARTITION BY RANGE (run_created_at)
        """
    )
    # DDL takes no parameters: the bounds are ISO timestamps this function made.
    run(
        f"CREATE TABLE runs_runevent_before PARTITION OF runs_runevent FOR VALUES FROM (MINVALUE) TO ('{monday.isoformat()}')"
    )
    for name, start, end in _week_partitions(monday, WEEKS_AHEAD + 1):
        run(f"CREATE TABLE \"{name}\" PARTITION OF runs_runevent FOR VALUES FROM ('{start}') TO ('{end}')")
    run("CREATE TABLE runs_runevent_default PARTITION OF runs_runevent DEFAULT")
    run(
        "INSERT INTO runs_runevent (id, run_id, seq, type, payload, created_at, run_created_at) "
        "SELECT e.id, e.run_id, e.seq, e.type, e.payload, e.created_at, r.created_at "
        "FROM runs_runevent_unpartitioned e JOIN runs_run r ON r.id = e.run_id"
    )
    run("DROP TABLE runs_runevent_unpartitioned")


class Migration(migrations.Migration):
    dependencies = [
        ("runs", "0006_webhook_url"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.AddField(
                    model_name="runevent",
                    name="run_created_at",
                    field=models.DateTimeField(default=None),
                    preserve_default=False,
                ),
            ],
            # Not reversible: going back would mean copying every event out of the partitions.
            database_operations=[migrations.RunPython(partition, elidable=False)],
        ),
    ]
