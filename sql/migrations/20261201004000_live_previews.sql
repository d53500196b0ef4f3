-- Watching a job form: an estimated completion time and a live preview image on the row while it
-- runs (worker/estimate.py, worker/preview.py, docs/previews.md).
--
--   estimated_completion_at  when the worker expects the job to end, from its measured step rate and
--                            the stages left; null while nothing is known, and once the job has left
--                            `processing`.
--   preview                  {bucket, path, url, content_type, width, height, step, steps, frames,
--                            updated_at, kept}: the one preview object of the job in its bucket,
--                            overwritten every few steps; null once the job has left `processing`,
--                            except on a completed job whose preview the operator keeps
--                            (OURVIDZ_PREVIEW_KEEP, `kept: true`).
--
-- Both are server columns: the owner reads them with the rest of the row (the table-level SELECT
-- of 20261122001000_security.sql), and only the worker writes them: authenticated holds INSERT
-- and UPDATE on named columns only, so nobody needs a revoke here.

alter table public.jobs
  add column estimated_completion_at timestamptz,
  add column preview jsonb check (preview is null or jsonb_typeof(preview) = 'object');

comment on column public.jobs.estimated_completion_at is
  'Worker''s estimate of when a processing job ends; null when unknown or not processing.';
comment on column public.jobs.preview is
  'Live preview object of a processing job {bucket, path, url, step, steps, ...}; see docs/previews.md.';

-- Whatever the update that ends a run (finish, retry, release, lease rescue, the cancel of a queued
-- job), the live columns do not outlive it: the estimate is meaningless and the worker has removed
-- the preview object (unless kept). Named after jobs_before_update, so it sees the status that
-- trigger may have set (BEFORE triggers fire in name order).
create function public.jobs_live_reset() returns trigger
  language plpgsql set search_path = '' as $$
begin
  new.estimated_completion_at := null;
  if not (new.status = 'completed' and coalesce(new.preview ->> 'kept', 'false') = 'true') then
    new.preview := null;
  end if;
  return new;
end
$$;

create trigger jobs_live_reset before update on public.jobs
  for each row
  when (new.status <> 'processing' and (new.estimated_completion_at is not null or new.preview is not null))
  execute function public.jobs_live_reset();

-- Realtime: the `job` broadcast (jobs_broadcast) carries the columns it names; the live columns go
-- as their own event `job_live` to the same private topics, `job:<id>` and `jobs:<user_id>`, only
-- when one of them changes on a running job. The worker moves the estimate only when it changes by
-- more than max(1 s, 5 %) (worker/queue.py REPORT_PROGRESS), so this is about one message per
-- preview, not one per progress write.
create function public.jobs_broadcast_live() returns trigger
  language plpgsql security definer set search_path = '' as $$
declare
  message jsonb := jsonb_build_object(
    'id', new.id, 'preview', new.preview, 'estimated_completion_at', new.estimated_completion_at,
    'updated_at', new.updated_at);
begin
  perform realtime.send(message, 'job_live', 'job:' || new.id, true);
  perform realtime.send(message, 'job_live', 'jobs:' || new.user_id, true);
  return null;
end
$$;

create trigger jobs_broadcast_live after update on public.jobs
  for each row
  when (new.user_id is not null and new.status = 'processing'
        and (old.preview, old.estimated_completion_at) is distinct from (new.preview, new.estimated_completion_at))
  execute function public.jobs_broadcast_live();

-- Trigger functions run for their triggers whoever holds EXECUTE (Supabase grants it to the API roles).
revoke execute on function public.jobs_live_reset(), public.jobs_broadcast_live() from public, anon, authenticated;
