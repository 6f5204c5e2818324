"""Queue and task names shared by producers, workers and beat."""

CONVERSIONS = "conversions"
RETRIES = "retries"
REPLAY = "replay"
MAINTENANCE = "maintenance"
QUEUES = (CONVERSIONS, RETRIES, REPLAY, MAINTENANCE)

TASK_PROCESS = "postback_worker.process_conversions"
TASK_DELIVER = "postback_worker.deliver_postbacks"
TASK_SWEEP = "postback_worker.sweep"
TASK_REQUEUE_STUCK = "postback_worker.requeue_stuck_conversions"
# Wake-up: conversions committed to the journal (args: their ids) wait for intake.
TASK_INTAKE = "postback_worker.intake"
# Set (with a short expiry) while a wake-up waits in the queue or a woken worker keeps
# taking events (it renews the flag each batch); producers that find it set publish none:
# that worker takes their events too. The worker deletes it when it stops taking. The
# expiry bounds how long producers stay silent when that wake-up sits in a busy worker's
# reserve (prefetched), was lost, or its worker died.
INTAKE_WOKEN_KEY = "pbw:intake:woken"
INTAKE_WOKEN_MS = 250
# How long a taking worker's renewal holds the flag, beyond its pause between batches.
INTAKE_HOLD_MS = 1000
