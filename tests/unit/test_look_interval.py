"""How often the trial's follower looks: on SQLite each look holds the store's one write lock."""

from services.safety.follower import look_interval
from shared.store.engine import make_engine


async def test_the_follower_looks_once_a_second_on_sqlite_and_four_times_a_second_on_postgresql() -> None:
    sqlite = make_engine("sqlite+aiosqlite:///:memory:")
    postgres = make_engine("postgresql+asyncpg://nobody@127.0.0.1:1/none")  # never connected
    try:
        assert look_interval(sqlite) == 1.0
        assert look_interval(postgres) == 0.25
    finally:
        await sqlite.dispose()
        await postgres.dispose()
