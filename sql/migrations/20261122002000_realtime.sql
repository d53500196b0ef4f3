-- Realtime: how a frontend watches its jobs. Two paths, both authorized by ownership:
--   Broadcast (recommended): a trigger sends each visible change of a user's job to the private
--     topic `job:<id>`; only the job's owner may join it. One message per change, no per-row
--     RLS check for each subscriber, so it scales with the number of watchers.
--   Postgres Changes (fallback): `jobs` is in the `supabase_realtime` publication; Realtime
--     reads the WAL and checks each change against the subscriber's RLS on `jobs`.

-- Idempotent: the table may already be published (dashboard toggle, or a FOR ALL TABLES publication).
do $$
begin
  if not exists (
    select 1 from pg_publication_tables
    where pubname = 'supabase_realtime' and schemaname = 'public' and tablename = 'jobs'
  ) then
    alter publication supabase_realtime add table public.jobs;
  end if;
end
$$;

-- FULL, not DEFAULT (primary key only): Postgres Changes then carries the old row of every
-- update, so a UI can tell which fields changed (status queued -> processing) from the event
-- alone, and filters on columns other than `id` (user_id=eq.<uid> for "my jobs") also match
-- deletes (retention pruning, a deleted user's cascade). The price is the old row in the WAL
-- of every update; progress writes are throttled per job, and service jobs with big payloads
-- are few, so this stays small next to the row writes themselves.
alter table public.jobs replica identity full;

-- The policy helpers live outside the schemas the Data API exposes, so they cannot be called
-- over HTTP. Security definer: the check reads `jobs` without depending on that table's own
-- grants and policies, and is a primary-key lookup.
create schema if not exists private;
grant usage on schema private to authenticated;

create function private.is_job_topic_owner(topic text) returns boolean
  language plpgsql stable security definer set search_path = '' as $$
begin
  -- Other topics (chat rooms, presence...) must get `false`, not a uuid cast error.
  if topic is null or topic !~* '^job:[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$' then
    return false;
  end if;
  return exists (
    select 1 from public.jobs
    where id = substr(topic, 5)::uuid and user_id = (select auth.uid())
  );
end
$$;

revoke execute on function private.is_job_topic_owner(text) from public;
grant execute on function private.is_job_topic_owner(text) to authenticated;

-- Realtime authorizes a private channel join by selecting from realtime.messages as the user,
-- with realtime.topic() set to the channel's topic.
create policy "job owners receive their job broadcasts" on realtime.messages
  for select to authenticated
  using (
    extension = 'broadcast'
    and topic = (select realtime.topic())
    and (select private.is_job_topic_owner(realtime.topic()))
  );

-- Security definer: a status change may come from the owner's own update (a cancel request
-- turns a queued job `canceled`), and that role cannot write realtime.messages.
create function public.jobs_broadcast() returns trigger
  language plpgsql security definer set search_path = '' as $$
begin
  perform realtime.send(
    jsonb_build_object(
      'id', new.id, 'status', new.status, 'progress', new.progress, 'stage', new.stage,
      'result', new.result, 'error', new.error, 'attempts', new.attempts,
      'max_attempts', new.max_attempts, 'cancel_requested', new.cancel_requested,
      'updated_at', new.updated_at),
    'job',
    'job:' || new.id,
    true);
  return null;
end
$$;

-- No column list: a status set by jobs_before_update (cancel of a queued job) must count too.
-- Lease heartbeats change none of these columns and send nothing. Jobs without an owner
-- (service, benchmark) have no topic anyone could join, so the function is not even called.
create trigger jobs_broadcast after update on public.jobs
  for each row
  when (new.user_id is not null
        and (old.status, old.progress, old.stage, old.result, old.error)
            is distinct from (new.status, new.progress, new.stage, new.result, new.error))
  execute function public.jobs_broadcast();
