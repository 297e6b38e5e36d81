"""Every write that can move a session in the inbox takes a value of the session counter, so a
walk of the inbox can tell exactly which sessions changed after it began (see sessions.selectors)."""

import django.db.models.functions.comparison
from django.db import migrations, models

# agentrun.counters.next_version(SESSIONS) as a function a statement can call, so that a touch
# sent as one statement (an event append's) takes its value without a round trip of its own.
# It locks the session's row before the counter, the order every session write takes: a touch
# that took the counter first could wait for a row whose holder waits for the counter.
TOUCH_VERSION_FUNCTION = """
CREATE FUNCTION agent_sessions_touch_version(touched_session_id text) RETURNS bigint
LANGUAGE sql VOLATILE AS $$
    SELECT 1 FROM agent_sessions_session WHERE session_id = touched_session_id FOR NO KEY UPDATE;
    INSERT INTO agentrun_counter (name, value) VALUES ('sessions', 1)
    ON CONFLICT (name) DO UPDATE SET value = agentrun_counter.value + 1
    RETURNING value;
$$
"""


class Migration(migrations.Migration):
    dependencies = [
        ("agentrun", "0002_counter_rows"),
        ("agent_sessions", "0003_session_id_255"),
    ]

    operations = [
        migrations.AddField(
            model_name="session",
            name="activity_version",
            field=models.BigIntegerField(db_default=0, default=0),
        ),
        migrations.AddField(
            model_name="session",
            name="inbox_version",
            field=models.GeneratedField(
                db_persist=True,
                expression=django.db.models.functions.comparison.Greatest("version", "activity_version"),
                output_field=models.BigIntegerField(),
            ),
        ),
        migrations.RemoveIndex(model_name="session", name="session_tenant_updated"),
        migrations.AddIndex(
            model_name="session",
            index=models.Index(fields=["tenant_id", "inbox_version"], name="session_tenant_inbox_version"),
        ),
        migrations.AddField(
            model_name="sessionreadcursor",
            name="read_version",
            field=models.BigIntegerField(db_default=0, default=0),
        ),
        migrations.AddIndex(
            model_name="sessionreadcursor",
            index=models.Index(fields=["reader_id", "read_version"], name="session_read_reader_version"),
        ),
        migrations.RunSQL(TOUCH_VERSION_FUNCTION, "DROP FUNCTION agent_sessions_touch_version(text)"),
    ]
