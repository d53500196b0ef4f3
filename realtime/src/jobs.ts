/**
 * The frontend side of the ourvidz-worker contract: the `public.jobs` row is the API.
 *
 * - submitJob: insert a row as the signed-in user (RLS: only for themself, only client columns).
 * - watchJob:  follow one job through the private Realtime Broadcast topic `job:<id>` (sent by a
 *              database trigger, joinable by the job's owner only), falling back to Postgres
 *              Changes when the private channel cannot be joined; the row is re-read on every
 *              (re)subscribe so a change sent while disconnected is never missed.
 * - watchJobs: follow all of a user's jobs on ONE channel, the private topic `jobs:<user_id>`
 *              (new jobs and every change), with the same fallback and re-read; Supabase caps
 *              the channels of one connection, so a list never opens a channel per job.
 * - cancelJob: ask for cancellation; a queued job is canceled at once, a running one at the
 *              handler's next progress point.
 */
import type { RealtimeChannel, SupabaseClient } from '@supabase/supabase-js'

// Any generated `Database` type (or none) is accepted.
// eslint-disable-next-line @typescript-eslint/no-explicit-any
export type AnySupabaseClient = SupabaseClient<any, any, any>

export type JobStatus = 'queued' | 'processing' | 'completed' | 'failed' | 'canceled'
export type TerminalStatus = Extract<JobStatus, 'completed' | 'failed' | 'canceled'>
export const TERMINAL_STATUSES: readonly TerminalStatus[] = ['completed', 'failed', 'canceled']

export function isTerminal(status: JobStatus): status is TerminalStatus {
  return (TERMINAL_STATUSES as readonly JobStatus[]).includes(status)
}

/** worker/jobs.py ErrorCode (tests/test_realtime.py keeps the two equal). */
export type JobErrorCode =
  | 'INVALID_INPUT'
  | 'UNKNOWN_JOB_TYPE'
  | 'GENERATION_FAILED'
  | 'OOM_ERROR'
  | 'MODEL_LOAD_ERROR'
  | 'MODEL_UNAVAILABLE'
  | 'NETWORK_ERROR'
  | 'STORAGE_ERROR'
  | 'TIMEOUT_ERROR'
  | 'DATABASE_ERROR'
  | 'WORKER_LOST'

export interface JobError {
  code: JobErrorCode
  message: string
  retryable: boolean
}

/** One entry of `errors`: a failed attempt, or one given back for a fault of the worker's own. */
export interface JobAttemptError extends JobError {
  attempt: number
  worker_id: string | null
  at: string
  /** The worker's own fault (storage refused, a model that cannot load there): no attempt spent. */
  worker_fault?: boolean
  scope?: string
}

/** One published file: `{bucket}/{user_id}/{job_id}/{index}.{ext}` in Supabase Storage. */
export interface JobAsset {
  bucket: string
  path: string
  /** Signed (expires at url_expires_at; re-sign `path` after that) or public URL. */
  url: string
  url_expires_at?: string
  content_type: string
  size: number
  index: number
  width?: number
  height?: number
  frames?: number
  fps?: number
  duration?: number
  [key: string]: unknown
}

export interface JobResult {
  assets?: JobAsset[]
  /** Chat job types. */
  text?: string
  seed?: number
  generation_time?: number
  [key: string]: unknown
}

export type Json = string | number | boolean | null | Json[] | { [key: string]: Json }

/** The live preview of a running job: one object in the job type's bucket, overwritten as it forms. */
export interface JobPreview {
  bucket: string
  path: string
  url: string
  content_type: string
  width?: number
  height?: number
  step?: number
  steps?: number
  frames?: number
  updated_at?: string
  /** Kept on the completed row (the operator's choice); else null once the job leaves processing. */
  kept?: boolean
  [key: string]: unknown
}

/**
 * A `public.jobs` row as the owner reads it. Written by hand: tests/test_realtime.py checks every
 * field against the columns of the migrated table (name, nullability, kind).
 */
export interface JobRow {
  id: string
  user_id: string | null
  job_type: string
  queue: string
  status: JobStatus
  payload: { [key: string]: Json }
  priority: number
  /** Round-robin place within the priority (users take turns); set at insert. */
  turn: number
  run_at: string
  attempts: number
  max_attempts: number
  worker_id: string | null
  lease_expires_at: string | null
  /** 0..100 */
  progress: number
  stage: string | null
  cancel_requested: boolean
  /** Set when completed; a partial result (streamed text) may appear while processing. */
  result: JobResult | null
  /** Set when failed, and for the last failed attempt of a retried job. */
  error: JobError | null
  errors: JobAttemptError[]
  created_at: string
  started_at: string | null
  finished_at: string | null
  updated_at: string
  /** The worker's estimate while processing; null when unknown or not processing. */
  estimated_completion_at: string | null
  preview: JobPreview | null
}

/**
 * What the broadcast trigger sends (event `job`) to `job:<id>` on each visible change, and to
 * `jobs:<user_id>` on each visible change and on insert.
 */
export type JobUpdate = Pick<
  JobRow,
  | 'id'
  | 'job_type'
  | 'status'
  | 'progress'
  | 'stage'
  | 'result'
  | 'error'
  | 'attempts'
  | 'max_attempts'
  | 'cancel_requested'
  | 'created_at'
  | 'started_at'
  | 'finished_at'
  | 'updated_at'
>

/** Event `job_live` on the same topics: a running job's preview or estimate moved. */
export type JobLiveUpdate = Pick<JobRow, 'id' | 'preview' | 'estimated_completion_at' | 'updated_at'>

export const JOB_BROADCAST_EVENT = 'job'
export const JOB_LIVE_EVENT = 'job_live'
export const jobTopic = (id: string): string => `job:${id}`
export const userJobsTopic = (userId: string): string => `jobs:${userId}`

// --- submit ------------------------------------------------------------------------------

export interface SubmitOptions {
  /** Within the range the job type allows (public.job_limits); default 0. */
  priority?: number
}

/**
 * Why an insert was refused. `code` is the Postgres error code: OVQTA (a quota: active jobs,
 * jobs per minute, payload or prompt size, priority range), OVTYP (unknown or disabled job
 * type), 42501 (not signed in / not allowed). `message` is written to be shown to the user.
 */
export class JobSubmitError extends Error {
  readonly code: string
  readonly hint: string | null
  /** For OVQTA: { quota, limit, current, job_type }. */
  readonly details: { [key: string]: Json } | null

  constructor(code: string, message: string, details: string | null, hint: string | null) {
    super(message)
    this.name = 'JobSubmitError'
    this.code = code
    this.hint = hint
    this.details = parseDetails(details)
  }

  get isQuota(): boolean {
    return this.code === 'OVQTA'
  }
}

function parseDetails(details: string | null): { [key: string]: Json } | null {
  if (!details) return null
  try {
    const parsed: unknown = JSON.parse(details)
    return typeof parsed === 'object' && parsed !== null && !Array.isArray(parsed)
      ? (parsed as { [key: string]: Json })
      : null
  } catch {
    return null
  }
}

/** Insert a job as the signed-in user and return the row (already `failed` for an unknown type). */
export async function submitJob(
  supabase: AnySupabaseClient,
  jobType: string,
  payload: { [key: string]: Json },
  opts: SubmitOptions = {},
): Promise<JobRow> {
  const row: { job_type: string; payload: { [key: string]: Json }; priority?: number } = {
    job_type: jobType,
    payload,
  }
  if (opts.priority !== undefined) row.priority = opts.priority
  const { data, error } = await supabase.from('jobs').insert(row).select().single()
  if (error) throw new JobSubmitError(error.code, error.message, error.details, error.hint)
  return data as JobRow
}

// --- cancel ------------------------------------------------------------------------------

/** Ask for cancellation. Returns the row, or null when the job had already ended. */
export async function cancelJob(supabase: AnySupabaseClient, id: string): Promise<JobRow | null> {
  const { data, error } = await supabase
    .from('jobs')
    .update({ cancel_requested: true })
    .eq('id', id)
    .in('status', ['queued', 'processing'])
    .select()
    .maybeSingle()
  if (error) throw new JobSubmitError(error.code, error.message, error.details, error.hint)
  return (data as JobRow | null) ?? null
}

// --- watch -------------------------------------------------------------------------------

export type WatchSource = 'broadcast' | 'postgres_changes' | 'read'

export interface WatchOptions {
  /** Give up (reject `done`) after this many milliseconds; default: never. */
  timeoutMs?: number
  /** Skip Broadcast and use Postgres Changes only. */
  postgresChangesOnly?: boolean
  /** Called when a channel fails; the watch goes on with the fallback or re-reads. */
  onError?: (err: Error) => void
  /**
   * A new live preview of the running job (SDXL/WAN, every few steps): show `url` (a new URL each
   * time, so no cache serves an old one). The estimate is `row.estimated_completion_at` in `onChange`.
   */
  onPreview?: (url: string, step: number | null, preview: JobPreview) => void
}

export interface JobWatch {
  /** Resolves with the terminal row; every channel is removed by then. */
  readonly done: Promise<JobRow>
  /** The newest row seen so far. */
  readonly current: () => JobRow | null
  /** Stop watching (rejects `done` if the job has not ended). */
  readonly stop: () => Promise<void>
}

/**
 * Follow one job until it ends. `onChange` gets the merged row each time it moves forward
 * (updates arrive from several sources and may repeat or interleave: older ones are dropped).
 */
export function watchJob(
  supabase: AnySupabaseClient,
  id: string,
  onChange: (row: JobRow, source: WatchSource) => void,
  opts: WatchOptions = {},
): JobWatch {
  let current: JobRow | null = null
  let channel: RealtimeChannel | null = null
  let finished = false
  let timer: ReturnType<typeof setTimeout> | undefined
  let resolveDone!: (row: JobRow) => void
  let rejectDone!: (err: Error) => void
  const done = new Promise<JobRow>((resolve, reject) => {
    resolveDone = resolve
    rejectDone = reject
  })

  const cleanup = async (): Promise<void> => {
    finished = true
    if (timer !== undefined) clearTimeout(timer)
    if (channel) {
      const ch = channel
      channel = null
      await supabase.removeChannel(ch)
    }
  }

  const offer = (update: Partial<JobRow>, source: WatchSource, live = false): void => {
    if (finished || update.id !== id) return
    const merged = live ? mergeLive(current, update) : mergeUpdate(current, update)
    if (merged === null) return
    const shown = current?.preview?.url
    current = merged.row
    if (!merged.moved) return
    const preview = current.preview
    if (preview && preview.url !== shown) opts.onPreview?.(preview.url, preview.step ?? null, preview)
    onChange(current, source)
    if (isTerminal(current.status)) {
      const row = current
      void cleanup().then(() => resolveDone(row))
    }
  }

  const reread = async (): Promise<void> => {
    const { data, error } = await supabase.from('jobs').select('*').eq('id', id).maybeSingle()
    if (error) {
      opts.onError?.(new Error(`reading job ${id}: ${error.message}`))
      return
    }
    if (!data) {
      void cleanup().then(() => rejectDone(new Error(`job ${id} not found (or not yours)`)))
      return
    }
    offer(data as JobRow, 'read')
  }

  const subscribe = (usePostgresChanges: boolean): void => {
    if (finished) return
    const ch = usePostgresChanges
      ? supabase.channel(`job-changes:${id}`).on<JobRow>(
          'postgres_changes',
          { event: 'UPDATE', schema: 'public', table: 'jobs', filter: `id=eq.${id}` },
          (change) => offer(change.new as JobRow, 'postgres_changes'),
        )
      : supabase
          .channel(jobTopic(id), { config: { private: true } })
          .on<JobUpdate>('broadcast', { event: JOB_BROADCAST_EVENT }, (message) =>
            offer(message.payload, 'broadcast'),
          )
          .on<JobLiveUpdate>('broadcast', { event: JOB_LIVE_EVENT }, (message) =>
            offer(message.payload, 'broadcast', true),
          )
    channel = ch
    ch.subscribe((status, err) => {
      if (finished || channel !== ch) return
      if (status === 'SUBSCRIBED') {
        // Also after an automatic rejoin: whatever was sent while away is in the row.
        void reread()
      } else if (status === 'CHANNEL_ERROR' || status === 'TIMED_OUT') {
        opts.onError?.(err ?? new Error(`${ch.topic}: ${status}`))
        if (!usePostgresChanges) {
          // Private channels unavailable (Realtime authorization off, or no policy yet).
          channel = null
          void supabase.removeChannel(ch).then(() => subscribe(true))
        }
      }
    })
  }

  if (opts.timeoutMs !== undefined) {
    timer = setTimeout(() => {
      void cleanup().then(() => rejectDone(new Error(`job ${id} did not end within ${opts.timeoutMs} ms`)))
    }, opts.timeoutMs)
  }

  // Private channels authorize with the user's JWT: hand the current session to Realtime first.
  void supabase.realtime
    .setAuth()
    .catch((err: unknown) => opts.onError?.(err instanceof Error ? err : new Error(String(err))))
    .finally(() => subscribe(opts.postgresChangesOnly === true))

  return {
    done,
    current: () => current,
    stop: async () => {
      if (finished) return
      await cleanup()
      rejectDone(new Error(`stopped watching job ${id}`))
    },
  }
}

// --- watch a user's jobs on one channel ---------------------------------------------------

export interface JobListCallbacks {
  /** A job of the user's was created or moved forward: its merged row. */
  onChange?: (row: JobRow, source: WatchSource) => void
  /** The newest rows as read from the database, at start and after each (re)subscribe. */
  onSync?: (rows: JobRow[]) => void
  /** A job left the table (retention pruning, the user deleted); Postgres Changes only. */
  onRemove?: (id: string) => void
  /** A channel failed; the watch goes on with the fallback or re-reads. */
  onError?: (err: Error) => void
  /** A running job of the user's has a new live preview (see WatchOptions.onPreview). */
  onPreview?: (row: JobRow, preview: JobPreview) => void
}

export interface JobListOptions {
  /** How many of the newest jobs the (re)subscribe read returns; default 50. */
  limit?: number
  /** Skip Broadcast and use Postgres Changes (`user_id=eq.<id>`) only. */
  postgresChangesOnly?: boolean
}

export interface JobListWatch {
  /** The jobs seen so far, newest first. */
  readonly jobs: () => JobRow[]
  readonly get: (id: string) => JobRow | undefined
  /** Remove the channel. */
  readonly stop: () => Promise<void>
}

/**
 * Follow every job of `userId` (the signed-in user) on one channel: the private broadcast topic
 * `jobs:<user_id>`, or Postgres Changes filtered on `user_id` when it cannot be joined. The
 * newest rows are re-read on each (re)subscribe, so nothing sent while disconnected is missed.
 */
export function watchJobs(
  supabase: AnySupabaseClient,
  userId: string,
  callbacks: JobListCallbacks,
  opts: JobListOptions = {},
): JobListWatch {
  const rows = new Map<string, JobRow>()
  let channel: RealtimeChannel | null = null
  let stopped = false

  const offer = (update: Partial<JobRow>, source: WatchSource, live = false): void => {
    if (stopped || typeof update.id !== 'string') return
    const current = rows.get(update.id) ?? null
    const merged = live ? mergeLive(current, update) : mergeUpdate(current, update)
    if (merged === null) return
    rows.set(update.id, merged.row)
    if (!merged.moved) return
    const preview = merged.row.preview
    if (preview && preview.url !== current?.preview?.url) callbacks.onPreview?.(merged.row, preview)
    callbacks.onChange?.(merged.row, source)
  }

  const reread = async (): Promise<void> => {
    const { data, error } = await supabase
      .from('jobs')
      .select('*')
      .eq('user_id', userId)
      .order('created_at', { ascending: false })
      .limit(opts.limit ?? 50)
    if (error) {
      callbacks.onError?.(new Error(`reading the jobs of ${userId}: ${error.message}`))
      return
    }
    for (const row of (data ?? []) as JobRow[]) offer(row, 'read')
    if (!stopped) callbacks.onSync?.(newestFirst(rows))
  }

  const subscribe = (usePostgresChanges: boolean): void => {
    if (stopped) return
    const ch = usePostgresChanges
      ? supabase.channel(`jobs-changes:${userId}`).on<JobRow>(
          'postgres_changes',
          { event: '*', schema: 'public', table: 'jobs', filter: `user_id=eq.${userId}` },
          (change) => {
            if (change.eventType === 'DELETE') {
              const gone = (change.old as Partial<JobRow>).id
              if (gone !== undefined && rows.delete(gone)) callbacks.onRemove?.(gone)
            } else {
              offer(change.new as JobRow, 'postgres_changes')
            }
          },
        )
      : supabase
          .channel(userJobsTopic(userId), { config: { private: true } })
          .on<JobUpdate>('broadcast', { event: JOB_BROADCAST_EVENT }, (message) =>
            offer(message.payload, 'broadcast'),
          )
          .on<JobLiveUpdate>('broadcast', { event: JOB_LIVE_EVENT }, (message) =>
            offer(message.payload, 'broadcast', true),
          )
    channel = ch
    ch.subscribe((status, err) => {
      if (stopped || channel !== ch) return
      if (status === 'SUBSCRIBED') {
        void reread()
      } else if (status === 'CHANNEL_ERROR' || status === 'TIMED_OUT') {
        callbacks.onError?.(err ?? new Error(`${ch.topic}: ${status}`))
        if (!usePostgresChanges) {
          channel = null
          void supabase.removeChannel(ch).then(() => subscribe(true))
        }
      }
    })
  }

  void supabase.realtime
    .setAuth()
    .catch((err: unknown) => callbacks.onError?.(err instanceof Error ? err : new Error(String(err))))
    .finally(() => subscribe(opts.postgresChangesOnly === true))

  return {
    jobs: () => newestFirst(rows),
    get: (id) => rows.get(id),
    stop: async () => {
      stopped = true
      if (channel) {
        const ch = channel
        channel = null
        await supabase.removeChannel(ch)
      }
    },
  }
}

function newestFirst(rows: Map<string, JobRow>): JobRow[] {
  return [...rows.values()].sort((a, b) => (a.created_at < b.created_at ? 1 : a.created_at > b.created_at ? -1 : 0))
}

interface Merged {
  row: JobRow
  /** The row moved forward (callers report it); false: an older or repeated version. */
  moved: boolean
}

/** Updates arrive from several sources and may repeat or interleave: older ones only fill gaps. */
function mergeUpdate(current: JobRow | null, update: Partial<JobRow>): Merged {
  if (current === null) return { row: update as JobRow, moved: true }
  if (!isNewer(update, current)) {
    // It may still carry columns a broadcast leaves out (payload, user_id, ...).
    return { row: { ...update, ...current } as JobRow, moved: false }
  }
  return { row: settle({ ...current, ...update }), moved: true }
}

/**
 * What the database does when a run ends (jobs_live_reset), for rows merged from a `job` broadcast,
 * which leaves the live columns out: no estimate, and no preview unless kept on a completed job.
 */
function settle(row: JobRow): JobRow {
  if (row.status === undefined || row.status === 'processing') return row
  const kept = row.status === 'completed' && row.preview?.kept === true
  return { ...row, estimated_completion_at: null, preview: kept ? row.preview : null }
}

/** Seconds until the worker expects the job to end (never below 0), or null when it has no estimate. */
export function secondsLeft(row: Pick<JobRow, 'estimated_completion_at'>, now: number = Date.now()): number | null {
  if (!row.estimated_completion_at) return null
  return Math.max(0, (Date.parse(row.estimated_completion_at) - now) / 1000)
}

/** A `job_live` message sets only the live columns, unless the row has moved past it. */
function mergeLive(current: JobRow | null, live: Partial<JobRow>): Merged | null {
  if (current === null || current.status === undefined || isTerminal(current.status)) return null
  if (live.updated_at !== undefined && current.updated_at !== undefined &&
      microseconds(live.updated_at) < microseconds(current.updated_at)) {
    return null
  }
  const row: JobRow = {
    ...current,
    preview: live.preview ?? null,
    estimated_completion_at: live.estimated_completion_at ?? null,
  }
  return { row, moved: true }
}

/** Terminal rows never change; otherwise the later `updated_at` wins (ties: same version). */
function isNewer(update: Partial<JobRow>, current: JobRow): boolean {
  if (isTerminal(current.status)) return false
  if (update.updated_at === undefined || current.updated_at === undefined) return true
  return microseconds(update.updated_at) > microseconds(current.updated_at)
}

/** Postgres timestamps have microseconds, Date.parse keeps milliseconds: two writes may share one. */
function microseconds(timestamp: string): number {
  const m = /^(.*T\d{2}:\d{2}:\d{2})(?:\.(\d+))?(.*)$/.exec(timestamp)
  if (!m) return Date.parse(timestamp) * 1000
  const fraction = (m[2] ?? '').padEnd(6, '0').slice(0, 6)
  return Date.parse(`${m[1]}${m[3]}`) * 1000 + Number(fraction)
}
