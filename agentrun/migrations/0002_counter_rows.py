from django.db import migrations


def create_counters(apps, schema_editor):
    Counter = apps.get_model("agentrun", "Counter")
    for name in ("sessions", "queue"):
        Counter.objects.get_or_create(name=name, defaults={"value": 0})


class Migration(migrations.Migration):
    dependencies = [("agentrun", "0001_initial")]

    operations = [migrations.RunPython(create_counters, migrations.RunPython.noop)]
