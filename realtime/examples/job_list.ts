// A user's job list, live, on one Realtime channel (type-checked with the helper).
import { createClient } from '@supabase/supabase-js'

import { watchJobs, type JobListWatch, type JobRow } from '../src/jobs'

const supabase = createClient('https://your-project.supabase.co', 'your-anon-key')

export async function showMyJobs(render: (jobs: JobRow[]) => void): Promise<JobListWatch> {
  const { data } = await supabase.auth.getUser()
  if (!data.user) throw new Error('sign in first')
  const list = watchJobs(supabase, data.user.id, {
    onSync: render, // the newest 50 rows, at start and after every reconnect
    onChange: () => render(list.jobs()), // a new job, a progress step, a preview, the end
    onError: (err) => console.warn(err.message), // the watch goes on (fallback or re-read)
  })
  return list // list.stop() when the view goes away
}
