"""The suite's fixture plugins from tests/support (the one copy of test support).

fp_pg and fp_s3 give the PostgreSQL and S3 tests their real servers; both
import their clients (psycopg, boto3, moto) only when a test asks for them,
so a developer without those extras still runs everything else.
"""

pytest_plugins = ["fp_pg", "fp_s3", "fp_backend"]
