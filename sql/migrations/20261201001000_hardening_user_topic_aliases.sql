-- What Supabase's Security Advisor asks of our functions, a per-user Realtime topic for job lists,
-- and the old worker's job type names as aliases.

-- 1. Every function has a fixed search_path, so no role can shadow the objects a body uses by
--    putting its own schema first. Their bodies already qualify every name.
alter function public.jobs_before_insert() set search_path = '';
alter function public.jobs_before_update() set search_path = '';
alter function public.jobs_notify() set search_path = '';
alter function public.job_types_notify() set search_path = '';

-- 2. Supabase grants EXECUTE on every new function in public to anon and authenticated. A trigger
--    function runs for its trigger whoever holds EXECUTE, so nobody needs it: revoked, including
--    the security definer jobs_broadcast. The only security definer functions an API role may call
--    are public.job_limits (authenticated: the limits of a job type, from job_quotas, which users
--    cannot read) and private.is_job_topic_owner (authenticated: the realtime.messages policy).
revoke execute on function public.jobs_before_insert(), public.jobs_before_update(), public.jobs_notify(),
  public.job_types_notify(), public.jobs_enforce_limits(), public.jobs_cancel_is_final(), public.jobs_broadcast()
  from public, anon, authenticated;

-- 3. A user's job list on one channel: every visible change of a job with an owner also goes to the
--    private topic `jobs:<user_id>`, and a new job is announced there, so a frontend follows all
--    its jobs with one subscription instead of one channel per job (Supabase caps channels per
--    connection). `job:<id>` keeps its updates. The payload adds job_type and the timestamps a
--    list shows; it leaves out `payload`, which may be large.
create or replace function public.jobs_broadcast() returns trigger
  language plpgsql security definer set search_path = '' as $$
declare
  message jsonb := jsonb_build_object(
    'id', new.id, 'job_type', new.job_type, 'status', new.status, 'progress', new.progress,
    'stage', new.stage, 'result', new.result, 'error', new.error, 'attempts', new.attempts,
    'max_attempts', new.max_attempts, 'cancel_requested', new.cancel_requested,
    'created_at', new.created_at, 'started_at', new.started_at, 'finished_at', new.finished_at,
    'updated_at', new.updated_at);
begin
  if tg_op = 'UPDATE' then
    perform realtime.send(message, 'job', 'job:' || new.id, true);
  end if;
  perform realtime.send(message, 'job', 'jobs:' || new.user_id, true);
  return null;
end
$$;

create trigger jobs_broadcast_insert after insert on public.jobs
  for each row when (new.user_id is not null)
  execute function public.jobs_broadcast();

-- The topic names the user, so the check needs no lookup.
create policy "users receive their job list broadcasts" on realtime.messages
  for select to authenticated
  using (
    extension = 'broadcast'
    and topic = (select realtime.topic())
    and topic = 'jobs:' || (select auth.uid())::text
  );

-- 4. The old worker's job types (seed 000), each the preset it ran as: a copy of that row (queue,
--    handler, model, bucket, defaults, limits, every column), its defaults marked with `alias_of`
--    like chat_unrestricted. A payload's config still overrides the defaults. A name the project
--    already uses is left alone.
insert into public.job_types
select (jsonb_populate_record(null::public.job_types, to_jsonb(t) || jsonb_build_object(
  'name', alias.name,
  'defaults', t.defaults || jsonb_build_object('alias_of', t.name),
  'description', format('Old worker name; runs as %s', t.name),
  'created_at', now(), 'updated_at', now()))).*
from (values ('sdxl_generate', 'sdxl_image_high'),
             ('wan_video', 'video_fast'),
             ('wan_image', 'image_fast')) as alias (name, target)
join public.job_types as t on t.name = alias.target
on conflict (name) do nothing;
